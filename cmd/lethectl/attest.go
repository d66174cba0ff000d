package main

import (
	"bytes"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/lethe-cc/lethe/attest"
	"github.com/lethe-cc/lethe/attest/emulate"
)

func newAttestCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "attest",
		Short: "Emulate and verify attestation evidence",
		Long: `Emulate SEV-SNP and TDX evidence in software, and verify evidence (emulated, or captured
on real hardware) offline against pinned roots of trust.`,
		Example: `  lethectl attest emulate --platform emulated-sev-snp --report-data 00 --roots-out roots --out ev.json
  lethectl attest verify ev.json --trust-roots roots --report-data 00`,
	}
	cmd.AddCommand(newAttestEmulateCmd(), newAttestVerifyCmd())
	return cmd
}

// decodeHexArg decodes a hex flag value (an optional 0x prefix allowed) of at most max bytes,
// or exactly max bytes when exact is set.
func decodeHexArg(name, value string, max int, exact bool) ([]byte, error) {
	var h attest.HexBytes
	if err := h.UnmarshalText([]byte(value)); err != nil {
		return nil, fmt.Errorf("--%s: %w", name, err)
	}
	switch {
	case exact && len(h) != max:
		return nil, fmt.Errorf("--%s is %d bytes, want %d", name, len(h), max)
	case len(h) > max:
		return nil, fmt.Errorf("--%s is %d bytes, want at most %d", name, len(h), max)
	}
	return h, nil
}

// parseSNPTCBFlag parses --tcb (attest.ParseSNPTCB's form).
func parseSNPTCBFlag(s string) (*attest.SNPTCB, error) {
	tcb, err := attest.ParseSNPTCB(s)
	if err != nil {
		return nil, fmt.Errorf("--tcb: %w", err)
	}
	return &tcb, nil
}

func newAttestEmulateCmd() *cobra.Command {
	var (
		platform, reportData, measurement, tcb, teeTCBSVN string
		out, rawOut, rootsOut, statement                  string
		debug                                             bool
	)
	cmd := &cobra.Command{
		Use:   "emulate --platform PLATFORM --report-data HEX --out FILE",
		Short: "Make evidence on an emulated SEV-SNP or TDX platform",
		Long: `Make evidence on an emulated platform (software signing with test roots of trust) and write
it as Lethe evidence JSON.

With --roots-out, the emulated platform is kept in that directory: its roots (which a verifier
needs, see "attest verify --trust-roots") and the keys that sign as it, so a second call with the
same directory signs as the same platform. Without it, the platform is made for this one call and
its roots are lost. Emulated evidence is for development and CI: it proves nothing about hardware.`,
		Example: `  # SEV-SNP evidence with a chosen measurement and TCB, roots kept in ./roots
  lethectl attest emulate --platform emulated-sev-snp --report-data 0011 \
    --measurement $(printf 'ab%.0s' $(seq 48)) --tcb bl=3,tee=0,snp=8,ucode=115 \
    --roots-out roots --out snp.json --raw-out snp.bin

  # TDX evidence of a debug TD, signed as the same emulated platform as before
  lethectl attest emulate --platform emulated-tdx --report-data 0011 --debug \
    --roots-out roots --out tdx.json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := attest.ParsePlatform(platform)
			if err != nil {
				return err
			}
			if !p.Emulated() {
				return fmt.Errorf("--platform %v is not emulated (want emulated-sev-snp or emulated-tdx)", p)
			}
			rd, err := decodeHexArg("report-data", reportData, attest.ReportDataSize, false)
			if err != nil {
				return err
			}
			opts := emulate.Options{Debug: debug}
			if measurement != "" {
				if opts.Measurement, err = decodeHexArg("measurement", measurement, 48, true); err != nil {
					return err
				}
			}
			if tcb != "" {
				if !p.IsSNP() {
					return errors.New("--tcb is for SEV-SNP; TDX takes --tee-tcb-svn")
				}
				if opts.TCB, err = parseSNPTCBFlag(tcb); err != nil {
					return err
				}
			}
			if teeTCBSVN != "" {
				if !p.IsTDX() {
					return errors.New("--tee-tcb-svn is for TDX; SEV-SNP takes --tcb")
				}
				if opts.TEETCBSVN, err = decodeHexArg("tee-tcb-svn", teeTCBSVN, 16, true); err != nil {
					return err
				}
			}

			var e emulate.Platform
			if rootsOut != "" {
				e, err = emulate.Open(rootsOut, p, opts)
			} else {
				e, err = emulate.New(p, opts)
			}
			if err != nil {
				return fmt.Errorf("emulating %v: %w", p, err)
			}
			var data [attest.ReportDataSize]byte
			copy(data[:], rd)
			raw, err := e.Attest(cmd.Context(), data)
			if err != nil {
				return fmt.Errorf("emulating %v evidence: %w", p, err)
			}
			ev := &attest.Evidence{Platform: p, Raw: raw}
			if statement != "" {
				if ev.Statement, err = readStatement(statement); err != nil {
					return err
				}
			}
			b, err := json.MarshalIndent(ev, "", "  ")
			if err != nil {
				return fmt.Errorf("encoding evidence: %w", err)
			}
			if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
				return fmt.Errorf("writing evidence: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %v evidence to %s\n", p, out)
			if rawOut != "" {
				if err := os.WriteFile(rawOut, raw, 0o644); err != nil {
					return fmt.Errorf("writing raw evidence: %w", err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "wrote %d raw bytes to %s\n", len(raw), rawOut)
			}
			if rootsOut != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "%v roots and keys are in %s\n", p, rootsOut)
			} else {
				fmt.Fprintln(cmd.ErrOrStderr(), "note: no --roots-out, so this platform's roots are gone and nothing can verify this evidence")
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&platform, "platform", "", "emulated platform: emulated-sev-snp or emulated-tdx")
	f.StringVar(&reportData, "report-data", "", "REPORT_DATA in hex, up to 64 bytes (zero-padded)")
	f.StringVar(&measurement, "measurement", "", "launch measurement in hex, 48 bytes (MRTD on TDX)")
	f.StringVar(&tcb, "tcb", "", "SEV-SNP TCB as bl=N,tee=N,snp=N,ucode=N: the reported, committed, current and launch TCB and the VCEK's")
	f.StringVar(&teeTCBSVN, "tee-tcb-svn", "", "TDX TEE_TCB_SVN in hex, 16 bytes")
	f.BoolVar(&debug, "debug", false, "make a debug guest (SNP policy DEBUG, TDX attribute DEBUG)")
	f.StringVar(&out, "out", "", "file to write the Lethe evidence JSON to")
	f.StringVar(&rawOut, "raw-out", "", "file to write the raw hardware bytes to (SNP report + certificate table, or TDX quote)")
	f.StringVar(&rootsOut, "roots-out", "", "directory keeping the emulated platform: its roots and signing keys")
	f.StringVar(&statement, "statement", "", "JSON file of the statement the evidence carries (such as a clean-memory statement); REPORT_DATA stays as --report-data gives it")
	for _, name := range []string{"platform", "report-data", "out"} {
		if err := cmd.MarkFlagRequired(name); err != nil {
			panic(err)
		}
	}
	return cmd
}

// readStatement reads a statement file and returns it in canonical JSON.
func readStatement(file string) ([]byte, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading statement: %w", err)
	}
	if !json.Valid(b) {
		return nil, fmt.Errorf("reading statement: %s is not JSON", file)
	}
	canon, err := attest.CanonicalJSON(json.RawMessage(b))
	if err != nil {
		return nil, fmt.Errorf("reading statement: %w", err)
	}
	return canon, nil
}

// azureInput is what an Azure CVM's evidence brings beside the SEV-SNP report it wraps: the HCL
// report, whose runtime data REPORT_DATA binds, and the VCEK chain (PEM) the evidence JSON
// carries, if any.
type azureInput struct {
	hcl  *attest.AzureHCLReport
	vcek []byte
}

// readAnyEvidence reads FILE as Lethe evidence JSON, a raw SEV-SNP report (with or without its
// certificate table), a raw TDX quote (v4 or v5), or an Azure CVM's HCL report, raw or in Azure
// evidence JSON ("report" and "vcek"). Raw bytes name the real platform unless platform says
// otherwise. For Azure evidence the SNP report inside is returned as the evidence, with the
// HCL report beside it.
func readAnyEvidence(b []byte, platform string) (*attest.Evidence, *azureInput, error) {
	if t := bytes.TrimSpace(b); len(t) > 0 && t[0] == '{' {
		if isAzureEvidenceJSON(t) {
			az, err := attest.ParseAzureEvidence(t)
			if err != nil {
				return nil, nil, err
			}
			ev, in, err := readAzureHCL(az.Report, platform)
			if err != nil {
				return nil, nil, err
			}
			in.vcek = az.VCEK
			return ev, in, nil
		}
		ev, err := attest.ParseEvidence(t)
		if err != nil {
			return nil, nil, err
		}
		if platform != "" && platform != ev.Platform.String() {
			return nil, nil, fmt.Errorf("--platform %s, but the evidence names %v", platform, ev.Platform)
		}
		return ev, nil, nil
	}
	if attest.IsAzureHCLReport(b) {
		return readAzureHCL(b, platform)
	}
	var kind attest.Platform
	switch {
	case len(b) >= 8 && isTDXQuoteVersion(binary.LittleEndian.Uint16(b[0:2])) && binary.LittleEndian.Uint32(b[4:8]) == 0x81:
		kind = attest.PlatformTDX // quote header: version 4 or 5, TEE type 0x81 (TDX)
	case len(b) >= abi.ReportSize && binary.LittleEndian.Uint32(b[0:4]) >= abi.ReportVersion2 && binary.LittleEndian.Uint32(b[0:4]) <= abi.ReportVersion5:
		kind = attest.PlatformSEVSNP
	default:
		return nil, nil, errors.New("reading evidence: not Lethe evidence JSON, an SEV-SNP report, a TDX quote or an Azure HCL report")
	}
	if platform != "" {
		p, err := attest.ParsePlatform(platform)
		if err != nil {
			return nil, nil, err
		}
		if p.IsSNP() != kind.IsSNP() {
			return nil, nil, fmt.Errorf("--platform %v, but the file holds a raw %v evidence", p, kind)
		}
		kind = p
	}
	return &attest.Evidence{Platform: kind, Raw: b}, nil, nil
}

// isTDXQuoteVersion reports whether v is a TDX quote version verify reads: 4, and 5 (TDX 1.5).
func isTDXQuoteVersion(v uint16) bool { return v == 4 || v == 5 }

// isAzureEvidenceJSON reports whether t is JSON with a "report" and no "platform": Azure CVM
// evidence rather than Lethe's.
func isAzureEvidenceJSON(t []byte) bool {
	var probe struct {
		Platform json.RawMessage `json:"platform"`
		Report   json.RawMessage `json:"report"`
	}
	return json.Unmarshal(t, &probe) == nil && probe.Platform == nil && probe.Report != nil
}

// readAzureHCL reads an Azure HCL report: the SEV-SNP report inside is the evidence.
func readAzureHCL(b []byte, platform string) (*attest.Evidence, *azureInput, error) {
	hcl, err := attest.ParseAzureHCLReport(b)
	if err != nil {
		return nil, nil, fmt.Errorf("reading evidence: %w", err)
	}
	kind := attest.PlatformSEVSNP
	if platform != "" {
		if kind, err = attest.ParsePlatform(platform); err != nil {
			return nil, nil, err
		}
		if !kind.IsSNP() {
			return nil, nil, fmt.Errorf("--platform %v, but the file holds an Azure HCL report, which wraps an SEV-SNP report", kind)
		}
	}
	return &attest.Evidence{Platform: kind, Raw: hcl.SNPReport}, &azureInput{hcl: hcl}, nil
}

// azureExpectation returns what an HCL report's SNP report must carry: the digest of the HCL
// runtime data. reportData (--report-data), if given, is the user-data the runtime data must
// hold, the one value in it that the guest chooses.
func azureExpectation(in *azureInput, reportData []byte) (attest.Expectation, error) {
	want := attest.Expectation{ReportData: in.hcl.ReportData()}
	if reportData == nil {
		return want, nil
	}
	rt, err := in.hcl.Runtime()
	if err != nil {
		return want, &attest.RejectError{Reason: attest.ReasonMalformed, Err: err}
	}
	got, expected := make([]byte, attest.ReportDataSize), make([]byte, attest.ReportDataSize)
	copy(got, rt.UserData)
	copy(expected, reportData)
	if len(rt.UserData) > attest.ReportDataSize || !bytes.Equal(got, expected) {
		return want, &attest.RejectError{Reason: attest.ReasonBinding, Err: fmt.Errorf("HCL runtime data user-data %x does not match --report-data %x", []byte(rt.UserData), expected)}
	}
	return want, nil
}

// azureClaims returns what verify prints of an HCL report beside the SNP report's claims.
func azureClaims(in *azureInput) (map[string]any, error) {
	rt, err := in.hcl.Runtime()
	if err != nil {
		return nil, err
	}
	return map[string]any{
		"hclVersion":        in.hcl.Version,
		"runtimeDataDigest": attest.HexBytes(in.hcl.ReportData()),
		"runtimeData":       rt,
		"letheBinding":      false,
	}, nil
}

const azureNote = "note: an Azure HCL report: its REPORT_DATA is the digest of the HCL runtime data (vTPM keys, VM configuration, user-data), and it matches; it carries no Lethe binding, so it is not usable as Lethe evidence"

// oidKDSCSPID is the AMD KDS extension naming the cloud provider of a VLEK certificate.
var oidKDSCSPID = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 3704, 1, 5}

// snpWithCert returns SEV-SNP raw evidence whose certificate table holds cert (PEM or DER) as
// the endorsement key it is, under its kind's GUID, in place of any the table had there. The
// kind is read from the certificate (AMD names the subject SEV-VCEK or SEV-VLEK, and only a
// VLEK names a cloud provider, CSP ID), not from the flag it came with (kind, "vcek" or
// "vlek"): a certificate given with the other flag is filed as what it is, and note says so.
func snpWithCert(raw, cert []byte, kind string) (_ []byte, note string, _ error) {
	if block, _ := pem.Decode(cert); block != nil {
		cert = block.Bytes
	}
	c, err := x509.ParseCertificate(cert)
	if err != nil {
		return nil, "", fmt.Errorf("--%s: parsing the certificate: %w", kind, err)
	}
	csp := ""
	for _, ext := range c.Extensions {
		if ext.Id.Equal(oidKDSCSPID) {
			if _, err := asn1.UnmarshalWithParams(ext.Value, &csp, "ia5"); err != nil || csp == "" {
				csp = "unreadable"
			}
		}
	}
	isVLEK := c.Subject.CommonName == "SEV-VLEK" || csp != ""
	guid := abi.VcekGUID
	switch {
	case kind == "vcek" && isVLEK:
		note = fmt.Sprintf("note: the --vcek certificate is a VLEK (subject %q, CSP ID %q): filed as the VLEK", c.Subject.CommonName, csp)
		guid = abi.VlekGUID
	case kind == "vlek" && !isVLEK:
		note = fmt.Sprintf("note: the --vlek certificate is a VCEK (subject %q, no CSP ID): filed as the VCEK", c.Subject.CommonName)
	case isVLEK:
		guid = abi.VlekGUID
	}
	if len(raw) < abi.ReportSize {
		return nil, "", fmt.Errorf("--%s: the evidence is too short for an SEV-SNP report", kind)
	}
	var table abi.CertTable
	if err := table.Unmarshal(raw[abi.ReportSize:]); err != nil {
		// Evidence whose table does not parse is malformed with or without the certificate:
		// left as it is, it is rejected as such, with a rejection line.
		return raw, note, nil
	}
	id := uuid.MustParse(guid)
	entries := []abi.CertTableEntry{{GUID: id, RawCert: cert}}
	for _, e := range table.Entries {
		if e.GUID != id {
			entries = append(entries, e)
		}
	}
	table.Entries = entries
	return append(bytes.Clone(raw[:abi.ReportSize]), table.Marshal()...), note, nil
}

// printClaimsJSON writes claims as indented JSON, byte strings in hex and the statement as the JSON
// it is, with extra's entries beside them.
func printClaimsJSON(w io.Writer, c *attest.Claims, extra map[string]any) error {
	b, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("encoding claims: %w", err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("encoding claims: %w", err)
	}
	if len(c.Statement) > 0 {
		if json.Valid(c.Statement) {
			m["statement"] = json.RawMessage(c.Statement)
		} else {
			s, _ := json.Marshal(hex.EncodeToString(c.Statement))
			m["statement"] = s
		}
	}
	for k, v := range extra {
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("encoding claims: %w", err)
		}
		m[k] = b
	}
	out, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding claims: %w", err)
	}
	_, err = fmt.Fprintf(w, "%s\n", out)
	return err
}

func newAttestVerifyCmd() *cobra.Command {
	var (
		reportData, trustRoots, collateral, vcekFile, product, now, platform string
		checkRevocations, chainOnly                                          bool
		vlekFile                                                             string
	)
	cmd := &cobra.Command{
		Use:   "verify FILE",
		Short: "Verify evidence offline and print its claims",
		Long: `Verify evidence and print its claims as JSON (byte strings in hex). The exit status is 0 only
when the evidence verifies; a rejection is printed as "rejected (<reason>): <details>" with
status 1.

FILE is Lethe evidence JSON, a raw SEV-SNP report (1184 bytes, optionally followed by its
certificate table), a raw TDX quote (v4, or v5 of TDX 1.5), or an Azure confidential VM's HCL
report (raw, or as Azure evidence JSON with "report" and "vcek"); raw bytes are taken as real
hardware evidence unless --platform says otherwise. Real evidence verifies against AMD's and
Intel's roots built into go-sev-guest and go-tdx-guest, with collateral (VCEK certificates, CRLs,
TCB info) from --collateral: a directory laid out as Lethe's offline collateral cache, or, for
TDX, a file of Intel collateral in the QuoteCollateralV3 JSON form (tcb_info, qe_identity, their
signatures and issuer chains, CRLs) that PCCS clients and DCAP verifiers exchange. Nothing is
fetched. A real TDX quote is verified only with TCB info and QE identity, and accepted only
when the platform, its TDX module and its quoting enclave are all rated UpToDate. Emulated
evidence verifies only against the roots in --trust-roots.

Without --report-data the chain is verified and REPORT_DATA is printed, but the binding of the
evidence to anything is not checked.

An Azure HCL report is verified for inspection: the SEV-SNP report inside is verified, its
REPORT_DATA must be the digest of the HCL runtime data (the vTPM keys, the VM configuration and
the guest's user-data, printed under "azure"), and --report-data, if given, is the user-data.
Such a report never carries a Lethe binding, so it is not usable as Lethe evidence.`,
		Example: `  # Emulated evidence, with its binding
  lethectl attest verify ev.json --trust-roots roots --report-data 0011

  # A report captured on a Milan machine (version 2: the product comes from the VCEK), checked
  # at the time it was captured
  lethectl attest verify report.bin --vcek vcek.der --product Milan --now 2024-03-01T00:00:00Z

  # A TDX quote with collateral from a cache directory, or from a QuoteCollateralV3 JSON file
  lethectl attest verify quote.dat --collateral cache
  lethectl attest verify quote.dat --collateral collateral.json --now 2025-07-01T00:00:00Z`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			stderr := cmd.ErrOrStderr()
			b, err := os.ReadFile(args[0])
			if err != nil {
				return fmt.Errorf("reading evidence: %w", err)
			}
			ev, azure, err := readAnyEvidence(b, platform)
			if err != nil {
				return err
			}
			digest := ev.Digest()
			if azure != nil && len(azure.vcek) > 0 && vcekFile == "" {
				// The VCEK the Azure evidence JSON carries; --vcek overrides it.
				if ev.Raw, _, err = snpWithCert(ev.Raw, azure.vcek, "vcek"); err != nil {
					return err
				}
			}
			for _, flag := range []struct{ kind, file string }{{"vcek", vcekFile}, {"vlek", vlekFile}} {
				kind, file := flag.kind, flag.file
				if file == "" {
					continue
				}
				if !ev.Platform.IsSNP() {
					return fmt.Errorf("--%s is for SEV-SNP evidence, not %v", kind, ev.Platform)
				}
				cert, err := os.ReadFile(file)
				if err != nil {
					return fmt.Errorf("reading --%s: %w", kind, err)
				}
				var note string
				if ev.Raw, note, err = snpWithCert(ev.Raw, cert, kind); err != nil {
					return err
				}
				if note != "" {
					fmt.Fprintln(cmd.ErrOrStderr(), note)
				}
			}
			cfg := attest.Config{ProductLine: product, CheckRevocations: checkRevocations, TDXChainOnly: chainOnly}
			if err := setCollateral(&cfg, collateral); err != nil {
				return err
			}
			if trustRoots != "" {
				if cfg.Roots, err = attest.LoadRoots(trustRoots); err != nil {
					return err
				}
			}
			if now != "" {
				t, err := time.Parse(time.RFC3339, now)
				if err != nil {
					return fmt.Errorf("--now: %w", err)
				}
				cfg.Now = func() time.Time { return t }
			}
			want := attest.Expectation{SkipReportData: true}
			if reportData != "" {
				rd, err := decodeHexArg("report-data", reportData, attest.ReportDataSize, false)
				if err != nil {
					return err
				}
				want = attest.Expectation{ReportData: rd}
			}
			if azure != nil {
				want, err = azureExpectation(azure, want.ReportData)
				if re, ok := errors.AsType[*attest.RejectError](err); ok {
					fmt.Fprintf(stderr, "rejected (%s): %v\n", re.Reason, re.Err)
					return &exitError{code: 1}
				}
			}
			v, err := attest.NewVerifier(cfg)
			if err != nil {
				return err
			}
			claims, err := v.Verify(cmd.Context(), ev, want)
			if re, ok := errors.AsType[*attest.RejectError](err); ok {
				fmt.Fprintf(stderr, "rejected (%s): %v\n", re.Reason, re.Err)
				return &exitError{code: 1}
			}
			if err != nil {
				return err
			}
			// The digest is of the evidence as given, before --vcek or --vlek completed it.
			claims.EvidenceDigest = digest[:]
			var extra map[string]any
			if azure != nil {
				if extra, err = azureClaims(azure); err != nil {
					return err
				}
				extra = map[string]any{"azure": extra}
			}
			if err := printClaimsJSON(cmd.OutOrStdout(), claims, extra); err != nil {
				return err
			}
			if azure != nil {
				fmt.Fprintln(stderr, azureNote)
			}
			if claims.TDX != nil && claims.TDX.TCBStatus == attest.TDXStatusUnknown {
				fmt.Fprintln(stderr, "note: --chain-only: the quote's signatures and PCK chain verify, but without TCB info and QE identity its TCB level is unknown; the keybroker refuses such evidence")
			}
			if reportData == "" {
				fmt.Fprintln(stderr, "note: no --report-data, so the binding was not checked: the evidence is genuine, but not shown to be fresh or bound to anything")
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&reportData, "report-data", "", "expected REPORT_DATA in hex, up to 64 bytes (zero-padded)")
	f.StringVar(&trustRoots, "trust-roots", "", "directory of extra roots of trust (an emulator's --roots-out)")
	f.StringVar(&collateral, "collateral", "", "offline collateral cache directory (VCEK certificates, CRLs, TDX TCB info and QE identity), or a TDX QuoteCollateralV3 JSON file")
	f.StringVar(&vcekFile, "vcek", "", "VCEK certificate (DER or PEM) of an SEV-SNP report that carries none (a VLEK given here is filed as the VLEK, with a note)")
	f.StringVar(&vlekFile, "vlek", "", "VLEK certificate (DER or PEM) of an SEV-SNP report that carries none (or place it in the --collateral cache under its VLEK name)")
	f.StringVar(&product, "product", "", "SEV-SNP product line (Milan, Genoa, Turin): assumed for a version 2 report whose VCEK does not say; a later report naming another product is rejected (chain)")
	f.StringVar(&now, "now", "", "verify certificates as of this RFC 3339 time (for captured evidence)")
	f.BoolVar(&checkRevocations, "check-revocations", false, "check every certificate against its CRL (AMD's ARK-signed CRLs, Intel's PCK and root CA CRLs) from --collateral; a CRL it does not hold is a rejection (collateral)")
	f.BoolVar(&chainOnly, "chain-only", false, "verify a real TDX quote given no --collateral by its signatures and PCK chain alone, its TCB status then Unknown (the keybroker never accepts that)")
	f.StringVar(&platform, "platform", "", "platform of raw evidence: sev-snp (default for a report), tdx (default for a quote), emulated-sev-snp, emulated-tdx")
	return cmd
}

// setCollateral points cfg at --collateral: a directory is the offline collateral cache, a file
// Intel TDX collateral in the QuoteCollateralV3 JSON form.
func setCollateral(cfg *attest.Config, path string) error {
	if path == "" {
		return nil
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("--collateral: %w", err)
	}
	if fi.IsDir() {
		cfg.CollateralDir = path
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("--collateral: %w", err)
	}
	if cfg.TDXCollateral, err = attest.PCCSCollateral(b); err != nil {
		return fmt.Errorf("--collateral %s: %w", path, err)
	}
	return nil
}
