package libvirt

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
)

// DefaultSocket is libvirtd's read-write unix socket on a host that runs it as a system
// service.
const DefaultSocket = "/run/libvirt/libvirt-sock"

// ErrDomainNotFound is returned when the host has no domain of the given name.
var ErrDomainNotFound = errors.New("domain not found")

// Config configures a connection to one host's libvirtd.
type Config struct {
	// Socket is the path of libvirtd's read-write unix socket. Empty means DefaultSocket.
	Socket string
	// DialTimeout bounds connecting when ctx has no deadline. Zero means 10 s.
	DialTimeout time.Duration
	// Logger receives info and debug records. Nil means none.
	Logger *slog.Logger
}

// Conn is a connection to one host's libvirtd (the qemu:///system driver). It is safe for
// concurrent use: libvirt RPCs are multiplexed over the one socket.
//
// go-libvirt's calls take no context: a Conn checks ctx before each call and, for a running
// migration, aborts the job when ctx ends; a call already sent to libvirtd is not interrupted.
type Conn struct {
	lv     *golibvirt.Libvirt
	socket string
	log    *slog.Logger
}

// Dial connects to the libvirtd listening on cfg.Socket.
func Dial(ctx context.Context, cfg Config) (*Conn, error) {
	if cfg.Socket == "" {
		cfg.Socket = DefaultSocket
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.DialTimeout)
		defer cancel()
	}
	var d net.Dialer
	dial := dialerFunc(func() (net.Conn, error) { return d.DialContext(ctx, "unix", cfg.Socket) })
	lv := golibvirt.NewWithDialer(dial)
	// The RPC handshake itself takes no context; the dial above does.
	if err := lv.ConnectToURI(golibvirt.QEMUSystem); err != nil {
		return nil, fmt.Errorf("connecting to libvirtd at %s: %w", cfg.Socket, err)
	}
	c := &Conn{lv: lv, socket: cfg.Socket, log: cfg.Logger.With(attrSocket, cfg.Socket)}
	c.log.Debug("Connected to libvirtd")
	return c, nil
}

// dialerFunc adapts a function to go-libvirt's socket.Dialer.
type dialerFunc func() (net.Conn, error)

func (f dialerFunc) Dial() (net.Conn, error) { return f() }

var _ socket.Dialer = dialerFunc(nil)

// Close disconnects from libvirtd. Domains and running jobs are not affected.
func (c *Conn) Close() error {
	if err := c.lv.Disconnect(); err != nil {
		return fmt.Errorf("disconnecting from libvirtd at %s: %w", c.socket, err)
	}
	return nil
}

// Disconnected is closed when the connection to libvirtd is lost or closed.
func (c *Conn) Disconnected() <-chan struct{} { return c.lv.Disconnected() }

// Host is what a host's libvirtd says about the host, for the agent's registration.
type Host struct {
	// Hostname is the host's name as libvirtd reports it.
	Hostname string
	// UUID is libvirtd's host UUID (host_uuid in libvirtd.conf, else from SMBIOS). Two
	// libvirt hosts with the same UUID cannot migrate to each other.
	UUID string
	// Arch is the host CPU architecture, e.g. x86_64.
	Arch string
	// CPUModel and CPUVendor describe the host CPU as libvirt names it.
	CPUModel, CPUVendor string
	// DomainTypes are the virtualization types the host offers for its own architecture,
	// e.g. qemu (TCG) and kvm.
	DomainTypes []string
	// LibvirtVersion and HypervisorVersion are major*1,000,000 + minor*1,000 + release.
	LibvirtVersion, HypervisorVersion uint64
	// CapabilitiesXML is libvirt's capabilities document, unparsed.
	CapabilitiesXML string
}

type capabilitiesXML struct {
	Host struct {
		UUID string `xml:"uuid"`
		CPU  struct {
			Arch   string `xml:"arch"`
			Model  string `xml:"model"`
			Vendor string `xml:"vendor"`
		} `xml:"cpu"`
	} `xml:"host"`
	Guests []struct {
		Arch struct {
			Name    string `xml:"name,attr"`
			Domains []struct {
				Type string `xml:"type,attr"`
			} `xml:"domain"`
		} `xml:"arch"`
	} `xml:"guest"`
}

// Host reports the host's identity and capabilities.
func (c *Conn) Host(ctx context.Context) (Host, error) {
	if err := ctx.Err(); err != nil {
		return Host{}, fmt.Errorf("reading host capabilities: %w", err)
	}
	raw, err := c.lv.ConnectGetCapabilities()
	if err != nil {
		return Host{}, fmt.Errorf("reading host capabilities: %w", err)
	}
	h, err := parseCapabilities(raw)
	if err != nil {
		return Host{}, err
	}
	if h.Hostname, err = c.lv.ConnectGetHostname(); err != nil {
		return Host{}, fmt.Errorf("reading hostname: %w", err)
	}
	if h.LibvirtVersion, err = c.lv.ConnectGetLibVersion(); err != nil {
		return Host{}, fmt.Errorf("reading libvirt version: %w", err)
	}
	if h.HypervisorVersion, err = c.lv.ConnectGetVersion(); err != nil {
		return Host{}, fmt.Errorf("reading hypervisor version: %w", err)
	}
	return h, nil
}

func parseCapabilities(raw string) (Host, error) {
	var caps capabilitiesXML
	if err := xml.Unmarshal([]byte(raw), &caps); err != nil {
		return Host{}, fmt.Errorf("parsing host capabilities: %w", err)
	}
	h := Host{
		UUID:            caps.Host.UUID,
		Arch:            caps.Host.CPU.Arch,
		CPUModel:        caps.Host.CPU.Model,
		CPUVendor:       caps.Host.CPU.Vendor,
		CapabilitiesXML: raw,
	}
	for _, g := range caps.Guests {
		if g.Arch.Name != h.Arch {
			continue
		}
		for _, d := range g.Arch.Domains {
			h.DomainTypes = append(h.DomainTypes, d.Type)
		}
	}
	return h, nil
}

// State is a domain's run state.
type State int

// Domain states, as libvirt's virDomainState.
const (
	StateNoState State = iota
	StateRunning
	StateBlocked
	StatePaused
	StateShutdown
	StateShutoff
	StateCrashed
	StatePMSuspended
)

var stateNames = [...]string{"nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed", "pmsuspended"}

// String returns virsh's name of the state.
func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// Active reports whether a domain in this state has a running hypervisor process.
func (s State) Active() bool { return s != StateShutoff && s != StateNoState }

// Domain describes one guest on the host.
type Domain struct {
	// Name is the domain's name, unique on the host.
	Name string
	// UUID is the domain's UUID in its canonical text form; it moves with the guest.
	UUID string
	// State is the domain's run state when it was listed.
	State State
	// Persistent says the domain is defined (outlives a stop), not transient.
	Persistent bool
	// MemoryBytes is the domain's maximum memory.
	MemoryBytes uint64
}

// Domains lists the host's domains, running and defined.
func (c *Conn) Domains(ctx context.Context) ([]Domain, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("listing domains: %w", err)
	}
	doms, _, err := c.lv.ConnectListAllDomains(1, golibvirt.ConnectListDomainsActive|golibvirt.ConnectListDomainsInactive)
	if err != nil {
		return nil, fmt.Errorf("listing domains: %w", err)
	}
	out := make([]Domain, 0, len(doms))
	for _, d := range doms {
		info, err := c.describe(d)
		if errors.Is(err, ErrDomainNotFound) {
			continue // gone since it was listed
		}
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	return out, nil
}

// Lookup describes the domain called name. It returns ErrDomainNotFound if there is none.
func (c *Conn) Lookup(ctx context.Context, name string) (Domain, error) {
	d, err := c.lookup(ctx, name)
	if err != nil {
		return Domain{}, err
	}
	return c.describe(d)
}

// State returns the state of the domain called name. It returns ErrDomainNotFound if there
// is none.
func (c *Conn) State(ctx context.Context, name string) (State, error) {
	d, err := c.lookup(ctx, name)
	if err != nil {
		return 0, err
	}
	st, _, err := c.lv.DomainGetState(d, 0)
	if err != nil {
		return 0, fmt.Errorf("reading state of domain %s: %w", name, notFound(err))
	}
	return State(st), nil
}

func (c *Conn) lookup(ctx context.Context, name string) (golibvirt.Domain, error) {
	if err := ctx.Err(); err != nil {
		return golibvirt.Domain{}, fmt.Errorf("looking up domain %s: %w", name, err)
	}
	d, err := c.lv.DomainLookupByName(name)
	if err != nil {
		return golibvirt.Domain{}, fmt.Errorf("looking up domain %s: %w", name, notFound(err))
	}
	return d, nil
}

func (c *Conn) describe(d golibvirt.Domain) (Domain, error) {
	st, _, err := c.lv.DomainGetState(d, 0)
	if err != nil {
		return Domain{}, fmt.Errorf("reading state of domain %s: %w", d.Name, notFound(err))
	}
	persistent, err := c.lv.DomainIsPersistent(d)
	if err != nil {
		return Domain{}, fmt.Errorf("reading persistence of domain %s: %w", d.Name, notFound(err))
	}
	_, maxKiB, _, _, _, err := c.lv.DomainGetInfo(d)
	if err != nil {
		return Domain{}, fmt.Errorf("reading memory of domain %s: %w", d.Name, notFound(err))
	}
	return Domain{Name: d.Name, UUID: formatUUID(d.UUID), State: State(st), Persistent: persistent == 1, MemoryBytes: maxKiB << 10}, nil
}

// Metadata returns the domain's custom metadata element in the XML namespace uri (as libvirt
// keeps it in the domain's <metadata>), or "" if the domain has none there. It returns
// ErrDomainNotFound if there is no domain called name.
func (c *Conn) Metadata(ctx context.Context, name, uri string) (string, error) {
	d, err := c.lookup(ctx, name)
	if err != nil {
		return "", err
	}
	md, err := c.lv.DomainGetMetadata(d, int32(golibvirt.DomainMetadataElement), golibvirt.OptString{uri}, golibvirt.DomainAffectCurrent)
	var lerr golibvirt.Error
	if errors.As(err, &lerr) && lerr.Code == uint32(golibvirt.ErrNoDomainMetadata) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("reading metadata of domain %s: %w", name, notFound(err))
	}
	return md, nil
}

// notFound maps libvirt's "no domain" error to ErrDomainNotFound, keeping the original.
func notFound(err error) error {
	if golibvirt.IsNotFound(err) {
		return fmt.Errorf("%w: %w", ErrDomainNotFound, err)
	}
	return err
}

func formatUUID(u golibvirt.UUID) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// Define defines (persistently) a domain from its XML and returns its name. A domain of the
// same name and UUID is redefined.
func (c *Conn) Define(ctx context.Context, domainXML string) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("defining domain: %w", err)
	}
	d, err := c.lv.DomainDefineXML(domainXML)
	if err != nil {
		return "", fmt.Errorf("defining domain: %w", err)
	}
	c.log.Info("Defined domain", attrDomain, d.Name)
	return d.Name, nil
}

// Start starts the defined domain called name. It returns ErrDomainNotFound if there is none.
func (c *Conn) Start(ctx context.Context, name string) error {
	d, err := c.lookup(ctx, name)
	if err != nil {
		return err
	}
	if err := c.lv.DomainCreate(d); err != nil {
		return fmt.Errorf("starting domain %s: %w", name, err)
	}
	c.log.Info("Started domain", attrDomain, name)
	return nil
}

// Remove stops the domain called name if it runs and undefines it if it is defined. A
// domain that does not exist is not an error.
func (c *Conn) Remove(ctx context.Context, name string) error {
	d, err := c.lookup(ctx, name)
	if errors.Is(err, ErrDomainNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if st, _, err := c.lv.DomainGetState(d, 0); err == nil && State(st).Active() {
		if err := c.lv.DomainDestroy(d); err != nil && !golibvirt.IsNotFound(err) {
			return fmt.Errorf("destroying domain %s: %w", name, err)
		}
	}
	if p, err := c.lv.DomainIsPersistent(d); err == nil && p == 1 {
		if err := c.lv.DomainUndefine(d); err != nil && !golibvirt.IsNotFound(err) {
			return fmt.Errorf("undefining domain %s: %w", name, err)
		}
	}
	c.log.Info("Removed domain", attrDomain, name)
	return nil
}
