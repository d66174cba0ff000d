package libvirt

import (
	"encoding/xml"
	"fmt"
	"path/filepath"
	"regexp"
	"strconv"
	"time"
)

// MemtestKernel is where Debian's memtest86+ package installs the 64-bit image that QEMU's
// -kernel boots under SeaBIOS (it carries a Linux boot-protocol header).
const MemtestKernel = "/boot/memtest86+x64.bin"

// GuestConfig describes a diskless guest that boots a kernel image directly, with its serial
// console written to a file: the memtest86+ guest of the libvirt tests, which rewrites all of
// its memory continuously and reports on the serial console whether what it wrote came back.
type GuestConfig struct {
	// Name is the domain name. Required.
	Name string
	// UUID is the domain UUID. Empty lets libvirt pick one.
	UUID string
	// MemoryMiB is the guest's memory. Zero means 128.
	MemoryMiB int
	// VCPUs is the number of virtual CPUs. Zero means 1.
	VCPUs int
	// Type is the domain type: "qemu" (TCG, works everywhere) or "kvm". Empty means "qemu".
	Type string
	// Kernel is the absolute path of the image to boot. Empty means MemtestKernel.
	Kernel string
	// Initrd is the absolute path of the initramfs the kernel unpacks. Empty means none.
	Initrd string
	// Cmdline is the kernel command line. Empty means "console=ttyS0,115200", which makes
	// memtest86+ draw its screen on the serial port.
	Cmdline string
	// SerialLog is the absolute path of the file the serial console is appended to. Required.
	// It is a path on the host where the guest runs: after a migration the destination's
	// hypervisor opens the same path on its own host.
	SerialLog string
	// Metadata is XML to put in the domain's <metadata> as is (elements in their own
	// namespaces, such as the agent's guest element). Empty means none.
	Metadata string
}

type domainXML struct {
	XMLName  xml.Name `xml:"domain"`
	Type     string   `xml:"type,attr"`
	Name     string   `xml:"name"`
	UUID     string   `xml:"uuid,omitempty"`
	Metadata *struct {
		Inner string `xml:",innerxml"`
	} `xml:"metadata,omitempty"`
	Memory struct {
		Unit  string `xml:"unit,attr"`
		Value int    `xml:",chardata"`
	} `xml:"memory"`
	VCPU int `xml:"vcpu"`
	OS   struct {
		Type struct {
			Arch    string `xml:"arch,attr"`
			Machine string `xml:"machine,attr"`
			Value   string `xml:",chardata"`
		} `xml:"type"`
		Kernel  string `xml:"kernel"`
		Initrd  string `xml:"initrd,omitempty"`
		Cmdline string `xml:"cmdline"`
	} `xml:"os"`
	OnPoweroff string `xml:"on_poweroff"`
	OnReboot   string `xml:"on_reboot"`
	OnCrash    string `xml:"on_crash"`
	Devices    struct {
		Controller struct {
			Type  string `xml:"type,attr"`
			Model string `xml:"model,attr"`
		} `xml:"controller"`
		Serial struct {
			Type   string `xml:"type,attr"`
			Source struct {
				Path   string `xml:"path,attr"`
				Append string `xml:"append,attr"`
			} `xml:"source"`
			Target struct {
				Port int `xml:"port,attr"`
			} `xml:"target"`
		} `xml:"serial"`
		Memballoon struct {
			Model string `xml:"model,attr"`
		} `xml:"memballoon"`
	} `xml:"devices"`
}

// GuestXML builds the libvirt domain XML for cfg: x86_64 "pc" machine, no disk, no network,
// no graphics, no USB, no balloon, serial port 0 appended to cfg.SerialLog.
func GuestXML(cfg GuestConfig) (string, error) {
	if cfg.Name == "" {
		return "", fmt.Errorf("building guest XML: name is required")
	}
	if cfg.SerialLog == "" || !filepath.IsAbs(cfg.SerialLog) {
		return "", fmt.Errorf("building guest XML: serial log %q must be an absolute path", cfg.SerialLog)
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 128
	}
	if cfg.VCPUs == 0 {
		cfg.VCPUs = 1
	}
	if cfg.Type == "" {
		cfg.Type = "qemu"
	}
	if cfg.Kernel == "" {
		cfg.Kernel = MemtestKernel
	}
	if cfg.Cmdline == "" {
		cfg.Cmdline = "console=ttyS0,115200"
	}
	if cfg.MemoryMiB < 0 || cfg.VCPUs < 0 || (cfg.Type != "qemu" && cfg.Type != "kvm") {
		return "", fmt.Errorf("building guest XML: bad memory %d MiB, %d vCPUs or type %q", cfg.MemoryMiB, cfg.VCPUs, cfg.Type)
	}
	var d domainXML
	d.Type = cfg.Type
	d.Name = cfg.Name
	d.UUID = cfg.UUID
	d.Memory.Unit = "MiB"
	d.Memory.Value = cfg.MemoryMiB
	d.VCPU = cfg.VCPUs
	d.OS.Type.Arch = "x86_64"
	d.OS.Type.Machine = "pc"
	d.OS.Type.Value = "hvm"
	d.OS.Kernel = cfg.Kernel
	d.OS.Initrd = cfg.Initrd
	d.OS.Cmdline = cfg.Cmdline
	d.OnPoweroff, d.OnReboot, d.OnCrash = "destroy", "restart", "destroy"
	d.Devices.Controller.Type, d.Devices.Controller.Model = "usb", "none"
	d.Devices.Serial.Type = "file"
	d.Devices.Serial.Source.Path = cfg.SerialLog
	d.Devices.Serial.Source.Append = "on"
	d.Devices.Memballoon.Model = "none"
	if cfg.Metadata != "" {
		d.Metadata = &struct {
			Inner string `xml:",innerxml"`
		}{Inner: cfg.Metadata}
	}
	out, err := xml.MarshalIndent(d, "", "  ")
	if err != nil {
		return "", fmt.Errorf("building guest XML: %w", err)
	}
	return string(out), nil
}

// MemtestStatus is what memtest86+ last drew on its serial console.
type MemtestStatus struct {
	// Elapsed is memtest's own clock ("Time:"), guest time since it started testing.
	Elapsed time.Duration
	// Pass is the number of completed passes over all memory.
	Pass int
	// Errors is the number of memory errors found; anything but 0 means memory did not keep
	// what was written to it.
	Errors int
	// Seen says a status line was found at all.
	Seen bool
}

var (
	memtestTime   = regexp.MustCompile(`Time:\s+(\d+):(\d{2}):(\d{2})`)
	memtestPass   = regexp.MustCompile(`Pass:\s+(\d+)`)
	memtestErrors = regexp.MustCompile(`Errors:\s+(\d+)`)
)

// ParseMemtestSerial reads the latest status from a memtest86+ serial log (VT100 screen
// updates). It uses the last value of each field; Errors is the largest value seen, so an
// error reported once is not hidden by a later redraw.
//
// Give it the output of one hypervisor process: the guest writes its screen a character at a
// time, so a migration can cut a line in two, its start in the source host's log and its end
// in the destination's, and a log that a guest came back to joins unrelated halves.
func ParseMemtestSerial(log []byte) MemtestStatus {
	var st MemtestStatus
	if m := memtestTime.FindAllSubmatch(log, -1); len(m) > 0 {
		last := m[len(m)-1]
		h, _ := strconv.Atoi(string(last[1]))
		mi, _ := strconv.Atoi(string(last[2]))
		s, _ := strconv.Atoi(string(last[3]))
		st.Elapsed = time.Duration(h)*time.Hour + time.Duration(mi)*time.Minute + time.Duration(s)*time.Second
		st.Seen = true
	}
	if m := memtestPass.FindAllSubmatch(log, -1); len(m) > 0 {
		st.Pass, _ = strconv.Atoi(string(m[len(m)-1][1]))
	}
	for _, m := range memtestErrors.FindAllSubmatch(log, -1) {
		n, _ := strconv.Atoi(string(m[1]))
		st.Errors = max(st.Errors, n)
	}
	return st
}
