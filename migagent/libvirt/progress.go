package libvirt

import (
	"context"
	"fmt"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// JobType is the kind of a domain's current (or last completed) job, as virDomainJobType.
type JobType int

// Job types.
const (
	JobNone JobType = iota
	JobBounded
	JobUnbounded
	JobCompleted
	JobFailed
	JobCancelled
)

var jobNames = [...]string{"none", "bounded", "unbounded", "completed", "failed", "cancelled"}

// String returns the job type's name.
func (j JobType) String() string {
	if j >= 0 && int(j) < len(jobNames) {
		return jobNames[j]
	}
	return fmt.Sprintf("job(%d)", int(j))
}

// Progress is a migration job's statistics from libvirt (virDomainGetJobStats). Counters that
// libvirt did not report are zero.
type Progress struct {
	// Job is the job's type: Unbounded while a migration runs, Completed, Failed or Cancelled
	// for a finished one.
	Job JobType
	// Elapsed is the time since the job started.
	Elapsed time.Duration
	// DataTotal, DataProcessed and DataRemaining count bytes of guest state to transfer:
	// total, sent so far (over all iterations), and still dirty.
	DataTotal, DataProcessed, DataRemaining uint64
	// MemoryBandwidth is the recent transfer rate, bytes per second.
	MemoryBandwidth uint64
	// DirtyRate is the guest's rate of dirtying memory, pages per second.
	DirtyRate uint64
	// PageSize is the size of a page in bytes, for DirtyRate.
	PageSize uint64
	// Iteration is the number of pre-copy passes over memory begun so far.
	Iteration uint64
	// Downtime is how long the guest was (for a completed job) or is expected to be paused.
	Downtime time.Duration
	// SetupTime is the time spent before the first byte was sent.
	SetupTime time.Duration
	// AutoConvergeThrottle is the percentage of vCPU time taken away by auto-converge.
	AutoConvergeThrottle int
	// PostcopyRequests counts page faults served from the source after switching to post-copy.
	PostcopyRequests uint64
	// Operation is the job's operation (virDomainJobOperation), e.g. 2 for an incoming
	// migration, 3 for an outgoing one.
	Operation int
	// Error is libvirt's message for a failed job.
	Error string
}

// DirtyBytesPerSecond is DirtyRate in bytes per second.
func (p Progress) DirtyBytesPerSecond() uint64 { return p.DirtyRate * p.PageSize }

// JobStats reads the statistics of the current job of the domain called name or, with
// completed, of its last completed job (which the destination keeps after an incoming
// migration). It returns ErrDomainNotFound if there is no such domain.
func (c *Conn) JobStats(ctx context.Context, name string, completed bool) (Progress, error) {
	d, err := c.lookup(ctx, name)
	if err != nil {
		return Progress{}, err
	}
	return c.jobStats(d, completed)
}

func (c *Conn) jobStats(d golibvirt.Domain, completed bool) (Progress, error) {
	var flags golibvirt.DomainGetJobStatsFlags
	if completed {
		flags = golibvirt.DomainJobStatsCompleted | golibvirt.DomainJobStatsKeepCompleted
	}
	typ, params, err := c.lv.DomainGetJobStats(d, flags)
	if err != nil {
		return Progress{}, fmt.Errorf("reading job stats of domain %s: %w", d.Name, notFound(err))
	}
	return progressFromParams(JobType(typ), params), nil
}

func progressFromParams(job JobType, params []golibvirt.TypedParam) Progress {
	p := Progress{Job: job}
	ms := func(v uint64) time.Duration { return time.Duration(v) * time.Millisecond }
	for _, tp := range params {
		switch tp.Field {
		case golibvirt.DomainJobErrmsg:
			if s, ok := tp.Value.I.(string); ok {
				p.Error = s
			}
			continue
		}
		v, ok := paramUint(tp.Value)
		if !ok {
			continue
		}
		switch tp.Field {
		case golibvirt.DomainJobTimeElapsed:
			p.Elapsed = ms(v)
		case golibvirt.DomainJobDataTotal:
			p.DataTotal = v
		case golibvirt.DomainJobDataProcessed:
			p.DataProcessed = v
		case golibvirt.DomainJobDataRemaining:
			p.DataRemaining = v
		case golibvirt.DomainJobMemoryBps:
			p.MemoryBandwidth = v
		case golibvirt.DomainJobMemoryDirtyRate:
			p.DirtyRate = v
		case golibvirt.DomainJobMemoryPageSize:
			p.PageSize = v
		case golibvirt.DomainJobMemoryIteration:
			p.Iteration = v
		case golibvirt.DomainJobDowntime:
			p.Downtime = ms(v)
		case golibvirt.DomainJobSetupTime:
			p.SetupTime = ms(v)
		case golibvirt.DomainJobAutoConvergeThrottle:
			p.AutoConvergeThrottle = int(v)
		case golibvirt.DomainJobMemoryPostcopyReqs:
			p.PostcopyRequests = v
		case golibvirt.DomainJobOperationStr:
			p.Operation = int(v)
		}
	}
	return p
}

// paramUint reads an integer typed parameter of any width; negative values read as 0.
func paramUint(v golibvirt.TypedParamValue) (uint64, bool) {
	switch x := v.I.(type) {
	case int32:
		return uint64(max(x, 0)), true
	case uint32:
		return uint64(x), true
	case int64:
		return uint64(max(x, 0)), true
	case uint64:
		return x, true
	case float64:
		return uint64(max(x, 0)), true
	}
	return 0, false
}
