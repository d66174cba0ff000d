package libvirt

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
)

var (
	// ErrNotRunning is returned by Destination.Finish when the migrated domain is not running
	// at the destination, and by Source.Confirm (cancelled) when the guest is not running at
	// the source again.
	ErrNotRunning = errors.New("domain is not running")
	// ErrStillRunning is returned by Source.Confirm (not cancelled) when the domain still runs
	// at the source after a migration that succeeded.
	ErrStillRunning = errors.New("domain still runs at the source")
)

// cleanupTimeout bounds the cancelling Finish and Confirm after a failure, which must run
// even when the caller's ctx has ended.
const cleanupTimeout = 60 * time.Second

// Settings tune one migration. The zero value is a live pre-copy migration with the
// hypervisor's defaults.
type Settings struct {
	// MaxDowntime is the longest the guest may be paused at cutover. Zero means the
	// hypervisor's default (300 ms for QEMU).
	MaxDowntime time.Duration
	// Bandwidth caps the transfer, MiB/s. Zero means unlimited.
	Bandwidth uint64
	// AutoConverge throttles the guest's vCPUs while pre-copy does not converge.
	AutoConverge bool
	// PostCopy allows switching to post-copy during Perform (Source.StartPostCopy); the
	// guest then runs at the destination while pages still arrive, and a failure after the
	// switch loses it. Set it only where the tenant's policy allows it.
	PostCopy bool
	// Parallel is the number of multifd channels the hypervisor moves memory over, beside
	// its main channel (VIR_MIGRATE_PARALLEL): Parallel+1 connections. Zero means none,
	// everything on the main channel.
	Parallel int
}

// Offer is what the source's Begin hands to the destination's Prepare through the control
// plane. It holds no key, but it describes the guest (its domain XML): send it only to the
// destination agent.
type Offer struct {
	// Domain is the domain's name.
	Domain string `json:"domain"`
	// XML is the domain's migratable XML, as the destination will define it.
	XML string `json:"xml"`
	// Cookie is libvirt's opaque migration cookie from Begin.
	Cookie []byte `json:"cookie"`
	// Flags are the virDomainMigrateFlags of this migration; both sides must use the same.
	Flags uint64 `json:"flags"`
	// Bandwidth is Settings.Bandwidth, MiB/s.
	Bandwidth uint64 `json:"bandwidth,omitempty"`
	// Parallel is Settings.Parallel: the multifd channels, with the main one Parallel+1
	// connections to the destination's endpoint, the main one first. Zero means one.
	Parallel int `json:"parallel,omitempty"`
}

// Accepted is the destination's answer to an Offer, for the source's Perform.
type Accepted struct {
	// Cookie is libvirt's opaque migration cookie from Prepare.
	Cookie []byte `json:"cookie"`
}

// Source is the source side of one migration, from Begin to Confirm. Its methods are safe
// to call concurrently (Progress and StartPostCopy while Perform runs).
type Source struct {
	c        *Conn
	dom      golibvirt.Domain
	settings Settings
	flags    golibvirt.DomainMigrateFlags
}

// Destination is the destination side of one migration, from Prepare to Finish.
type Destination struct {
	c     *Conn
	offer Offer
	ep    Endpoint
}

// Begin starts migrating the domain called name away from this host (Begin3): libvirt takes
// the domain's migration job and returns what the destination needs. After a successful
// Begin the migration must end with Confirm, cancelled if anything later failed. It returns
// ErrDomainNotFound if there is no such domain.
func (c *Conn) Begin(ctx context.Context, name string, s Settings) (*Source, Offer, error) {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return nil, Offer{}, err
	}
	persistent, err := c.lv.DomainIsPersistent(dom)
	if err != nil {
		return nil, Offer{}, fmt.Errorf("reading persistence of domain %s: %w", name, notFound(err))
	}
	flags := golibvirt.MigrateLive | golibvirt.MigrateChangeProtection
	if persistent == 1 {
		// The guest moves with its definition: defined at the destination, undefined here.
		flags |= golibvirt.MigratePersistDest | golibvirt.MigrateUndefineSource
	}
	if s.AutoConverge {
		flags |= golibvirt.MigrateAutoConverge
	}
	if s.PostCopy {
		flags |= golibvirt.MigratePostcopy
	}
	if s.Parallel > 0 {
		flags |= golibvirt.MigrateParallel
	}
	src := &Source{c: c, dom: dom, settings: s, flags: flags}
	cookie, domXML, err := c.lv.DomainMigrateBegin3Params(dom, src.params(), uint32(flags))
	if err != nil {
		return nil, Offer{}, fmt.Errorf("beginning migration of domain %s: %w", name, notFound(err))
	}
	if s.MaxDowntime > 0 {
		if err := c.lv.DomainMigrateSetMaxDowntime(dom, uint64(s.MaxDowntime.Milliseconds()), 0); err != nil {
			src.cancel(ctx)
			return nil, Offer{}, fmt.Errorf("setting max downtime of domain %s: %w", name, err)
		}
	}
	c.log.Info("Began migration", attrDomain, name)
	return src, Offer{Domain: name, XML: domXML, Cookie: cookie, Flags: uint64(flags), Bandwidth: s.Bandwidth, Parallel: s.Parallel}, nil
}

func (s *Source) params() []golibvirt.TypedParam {
	var ps []golibvirt.TypedParam
	if s.settings.Bandwidth > 0 {
		ps = append(ps, golibvirt.TypedParam{Field: golibvirt.MigrateParamBandwidth, Value: *golibvirt.NewTypedParamValueUllong(s.settings.Bandwidth)})
	}
	return append(ps, parallelParams(s.settings.Parallel)...)
}

// parallelParams are the migration parameters for n multifd channels.
func parallelParams(n int) []golibvirt.TypedParam {
	if n <= 0 {
		return nil
	}
	return []golibvirt.TypedParam{{Field: golibvirt.MigrateParamParallelConnections, Value: *golibvirt.NewTypedParamValueInt(int32(n))}}
}

// cancel ends a begun migration that will not go on.
func (s *Source) cancel(ctx context.Context) {
	if err := s.Confirm(ctx, nil, true); err != nil {
		s.c.log.Warn("Cancelling migration failed", attrDomain, s.dom.Name, attrError, err)
	}
}

// Domain is the name of the migrating domain.
func (s *Source) Domain() string { return s.dom.Name }

// destinationFlags are the flags for Prepare and Finish, as libvirt's own client computes them.
func destinationFlags(f uint64) uint32 {
	return uint32(golibvirt.DomainMigrateFlags(f) &^ (golibvirt.MigrateAbortOnError | golibvirt.MigrateAutoConverge))
}

// Prepare gets this host ready to receive the offered domain (Prepare3): libvirt starts the
// destination hypervisor, paused, listening for the migration stream on listen, a local
// endpoint that only the destination agent feeds (DialEndpoint). After a successful Prepare
// the migration must end with Finish, cancelled if anything later failed.
func (c *Conn) Prepare(ctx context.Context, offer Offer, listen Endpoint) (*Destination, Accepted, error) {
	if err := listen.Validate(); err != nil {
		return nil, Accepted{}, fmt.Errorf("preparing incoming migration: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, Accepted{}, fmt.Errorf("preparing incoming migration: %w", err)
	}
	ps := []golibvirt.TypedParam{
		{Field: golibvirt.MigrateParamDestName, Value: *golibvirt.NewTypedParamValueString(offer.Domain)},
		{Field: golibvirt.MigrateParamDestXML, Value: *golibvirt.NewTypedParamValueString(offer.XML)},
		{Field: golibvirt.MigrateParamURI, Value: *golibvirt.NewTypedParamValueString(listen.URI())},
	}
	if listen.Network == "tcp" {
		// Without it QEMU would listen on qemu.conf's migration_address or on every address.
		ap := netip.MustParseAddrPort(listen.Address) // validated above
		ps = append(ps, golibvirt.TypedParam{Field: golibvirt.MigrateParamListenAddress, Value: *golibvirt.NewTypedParamValueString(ap.Addr().String())})
	}
	if offer.Bandwidth > 0 {
		ps = append(ps, golibvirt.TypedParam{Field: golibvirt.MigrateParamBandwidth, Value: *golibvirt.NewTypedParamValueUllong(offer.Bandwidth)})
	}
	ps = append(ps, parallelParams(offer.Parallel)...)
	cookie, _, err := c.lv.DomainMigratePrepare3Params(ps, offer.Cookie, destinationFlags(offer.Flags))
	if err != nil {
		return nil, Accepted{}, fmt.Errorf("preparing incoming migration of domain %s: %w", offer.Domain, err)
	}
	c.log.Info("Prepared incoming migration", attrDomain, offer.Domain, attrURI, listen.URI())
	return &Destination{c: c, offer: offer, ep: listen}, Accepted{Cookie: cookie}, nil
}

// Endpoint is where the destination hypervisor listens for the migration stream.
func (d *Destination) Endpoint() Endpoint { return d.ep }

// Domain is the name of the incoming domain.
func (d *Destination) Domain() string { return d.offer.Domain }

// Perform runs the migration (Perform3): the source hypervisor sends its stream to to, a
// local endpoint the source agent listens on (ListenEndpoint), and Perform returns when the
// stream is complete and the guest paused here, or the migration failed. It returns the
// cookie for Finish. If ctx ends first the job is aborted and the migration fails; either
// way a failed Perform must be followed by Finish and Confirm, cancelled.
func (s *Source) Perform(ctx context.Context, accepted Accepted, to Endpoint) ([]byte, error) {
	if err := to.Validate(); err != nil {
		return nil, fmt.Errorf("performing migration: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("performing migration of domain %s: %w", s.dom.Name, err)
	}
	stop := context.AfterFunc(ctx, func() {
		if err := s.c.lv.DomainAbortJob(s.dom); err != nil {
			s.c.log.Warn("Aborting migration job failed", attrDomain, s.dom.Name, attrError, err)
		}
	})
	defer stop()
	ps := append(s.params(), golibvirt.TypedParam{Field: golibvirt.MigrateParamURI, Value: *golibvirt.NewTypedParamValueString(to.URI())})
	start := time.Now()
	cookie, err := s.c.lv.DomainMigratePerform3Params(s.dom, nil, ps, accepted.Cookie, s.flags)
	if err != nil {
		if ctx.Err() != nil {
			err = errors.Join(ctx.Err(), err)
		}
		return nil, fmt.Errorf("performing migration of domain %s: %w", s.dom.Name, err)
	}
	s.c.log.Info("Performed migration", attrDomain, s.dom.Name, attrURI, to.URI(), attrElapsed, time.Since(start))
	return cookie, nil
}

// Progress reads the running migration job's statistics.
func (s *Source) Progress(ctx context.Context) (Progress, error) {
	if err := ctx.Err(); err != nil {
		return Progress{}, fmt.Errorf("reading migration progress: %w", err)
	}
	return s.c.jobStats(s.dom, false)
}

// StartPostCopy switches the running migration to post-copy. It fails unless
// Settings.PostCopy was set.
func (s *Source) StartPostCopy(ctx context.Context) error {
	if !s.settings.PostCopy {
		return fmt.Errorf("starting post-copy of domain %s: post-copy was not allowed", s.dom.Name)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("starting post-copy of domain %s: %w", s.dom.Name, err)
	}
	if err := s.c.lv.DomainMigrateStartPostCopy(s.dom, 0); err != nil {
		return fmt.Errorf("starting post-copy of domain %s: %w", s.dom.Name, err)
	}
	return nil
}

// Finish ends the incoming migration (Finish3) with the cookie from Perform. Not cancelled,
// libvirt resumes the guest here, and Finish returns the cookie for Confirm only once the
// domain runs (else an error wrapping ErrNotRunning; Confirm must then be cancelled).
// Cancelled, libvirt kills the paused destination hypervisor and keeps no domain; Finish
// returns no cookie and no error unless that cleanup failed.
func (d *Destination) Finish(ctx context.Context, cookie []byte, cancelled bool) ([]byte, error) {
	if err := ctx.Err(); err != nil && !cancelled {
		return nil, fmt.Errorf("finishing incoming migration of domain %s: %w", d.offer.Domain, err)
	}
	ps := []golibvirt.TypedParam{
		{Field: golibvirt.MigrateParamDestName, Value: *golibvirt.NewTypedParamValueString(d.offer.Domain)},
		{Field: golibvirt.MigrateParamURI, Value: *golibvirt.NewTypedParamValueString(d.ep.URI())},
	}
	_, out, err := d.c.lv.DomainMigrateFinish3Params(ps, cookie, destinationFlags(d.offer.Flags), boolInt(cancelled))
	d.c.log.Info("Finished incoming migration", attrDomain, d.offer.Domain, attrCanceled, cancelled)
	if cancelled {
		// libvirt reports the cancellation itself as an error; what matters is that no domain
		// is left behind.
		st, serr := d.c.State(context.WithoutCancel(ctx), d.offer.Domain)
		switch {
		case errors.Is(serr, ErrDomainNotFound):
			return nil, nil
		case serr != nil:
			return nil, fmt.Errorf("checking cancelled incoming migration of domain %s: %w", d.offer.Domain, serr)
		default:
			return nil, fmt.Errorf("cancelling incoming migration of domain %s: domain left %s: %w", d.offer.Domain, st, err)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("finishing incoming migration of domain %s: %w", d.offer.Domain, err)
	}
	st, err := d.c.State(context.WithoutCancel(ctx), d.offer.Domain)
	if err != nil {
		return nil, fmt.Errorf("checking migrated domain %s: %w", d.offer.Domain, err)
	}
	if st != StateRunning {
		return nil, fmt.Errorf("checking migrated domain %s: %s: %w", d.offer.Domain, st, ErrNotRunning)
	}
	return out, nil
}

// Stats reads the statistics of the completed incoming migration.
func (d *Destination) Stats(ctx context.Context) (Progress, error) {
	return d.c.JobStats(ctx, d.offer.Domain, true)
}

// Confirm ends the migration at the source (Confirm3) with the cookie from Finish. Not
// cancelled, libvirt kills the paused source hypervisor (and undefines a persistent domain),
// and Confirm checks the domain no longer runs here (else an error wrapping ErrStillRunning).
// Cancelled, libvirt resumes the guest here, and Confirm checks it runs (else an error
// wrapping ErrNotRunning). It runs even after ctx ended, bounded by its own timeout.
func (s *Source) Confirm(ctx context.Context, cookie []byte, cancelled bool) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	cerr := s.c.lv.DomainMigrateConfirm3Params(s.dom, s.params(), cookie, uint32(s.flags), boolInt(cancelled))
	s.c.log.Info("Confirmed migration", attrDomain, s.dom.Name, attrCanceled, cancelled)
	if cancelled {
		// A Perform that failed before the guest was paused has already ended the job and
		// resumed nothing that needed resuming; libvirt then refuses the Confirm as "not being
		// migrated". What matters is that the guest runs here.
		st, err := s.c.State(ctx, s.dom.Name)
		switch {
		case err != nil:
			return errors.Join(cerr, fmt.Errorf("checking domain %s after cancelled migration: %w", s.dom.Name, err))
		case st != StateRunning:
			return errors.Join(cerr, fmt.Errorf("checking domain %s after cancelled migration: %s: %w", s.dom.Name, st, ErrNotRunning))
		}
		if cerr != nil {
			s.c.log.Debug("Cancelled migration was already ended", attrDomain, s.dom.Name, attrError, cerr)
		}
		return nil
	}
	if cerr != nil {
		return fmt.Errorf("confirming migration of domain %s: %w", s.dom.Name, cerr)
	}
	st, err := s.c.State(ctx, s.dom.Name)
	switch {
	case errors.Is(err, ErrDomainNotFound):
		return nil
	case err != nil:
		return fmt.Errorf("checking migrated domain %s is gone: %w", s.dom.Name, err)
	case st.Active():
		return fmt.Errorf("checking migrated domain %s is gone: %s: %w", s.dom.Name, st, ErrStillRunning)
	}
	return nil
}

func boolInt(b bool) int32 {
	if b {
		return 1
	}
	return 0
}

// MigrateConfig configures Migrate.
type MigrateConfig struct {
	// Source and Destination are the two hosts' connections. Required.
	Source, Destination *Conn
	// Domain is the name of the domain to move. Required.
	Domain string
	// Settings tune the migration.
	Settings Settings
	// Send is where the source hypervisor sends its stream: a local endpoint someone listens
	// on and carries to Receive. Required.
	Send Endpoint
	// Receive is where the destination hypervisor listens. Required. Send may equal Receive
	// when nothing is to sit in between.
	Receive Endpoint
	// Progress, if not nil, is called with the source's job statistics every
	// ProgressInterval while the stream runs.
	Progress func(Progress)
	// ProgressInterval is the period of Progress calls. Zero means 1 s.
	ProgressInterval time.Duration
}

// MigrateResult describes a completed migration.
type MigrateResult struct {
	// Stats are the destination's statistics of the completed incoming migration.
	Stats Progress
	// Elapsed is the time from Begin to Confirm.
	Elapsed time.Duration
}

// Migrate moves a domain between two hosts with both connections in one process: Begin,
// Prepare, Perform, Finish, Confirm, cancelling Finish and Confirm on failure so that the
// guest keeps running at the source and the destination keeps no domain, as libvirt's own
// client does (virDomainMigrateVersion3Full). The agents run the same steps, split by host.
// The returned error joins the failed step's error with any error from cancelling.
func Migrate(ctx context.Context, cfg MigrateConfig) (MigrateResult, error) {
	if cfg.Source == nil || cfg.Destination == nil || cfg.Domain == "" {
		return MigrateResult{}, errors.New("migrating: source, destination and domain are required")
	}
	if cfg.ProgressInterval == 0 {
		cfg.ProgressInterval = time.Second
	}
	start := time.Now()
	src, offer, err := cfg.Source.Begin(ctx, cfg.Domain, cfg.Settings)
	if err != nil {
		return MigrateResult{}, err
	}
	dst, accepted, err := cfg.Destination.Prepare(ctx, offer, cfg.Receive)
	if err != nil {
		return MigrateResult{}, errors.Join(err, src.Confirm(ctx, nil, true))
	}
	var stopProgress func()
	if cfg.Progress != nil {
		stopProgress = watchProgress(ctx, src, cfg.ProgressInterval, cfg.Progress)
	}
	cookie, perr := src.Perform(ctx, accepted, cfg.Send)
	if stopProgress != nil {
		stopProgress()
	}
	if perr != nil {
		_, ferr := dst.Finish(ctx, cookie, true)
		return MigrateResult{}, errors.Join(perr, ferr, src.Confirm(ctx, nil, true))
	}
	cookie, ferr := dst.Finish(ctx, cookie, false)
	if ferr != nil {
		return MigrateResult{}, errors.Join(ferr, src.Confirm(ctx, nil, true))
	}
	if err := src.Confirm(ctx, cookie, false); err != nil {
		return MigrateResult{}, err
	}
	res := MigrateResult{Elapsed: time.Since(start)}
	if res.Stats, err = dst.Stats(ctx); err != nil {
		return res, err
	}
	return res, nil
}

// watchProgress calls fn with src's progress every interval until the returned stop is
// called; stop waits for the watcher to end.
func watchProgress(ctx context.Context, src *Source, interval time.Duration, fn func(Progress)) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if p, err := src.Progress(ctx); err == nil && p.Job != JobNone {
				fn(p)
			}
		}
	}()
	return func() { cancel(); <-done }
}
