package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"time"

	"github.com/google/go-sev-guest/abi"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/go-sev-guest/validate"
	"github.com/google/go-sev-guest/verify"
	"github.com/google/go-sev-guest/verify/trust"
)

// go-sev-guest v0.15.0 refuses every Turin VCEK (its fmcSPL extension is unknown to it) and
// cannot be told to skip that check, so a Turin report takes the steps of its verify and
// validate packages here, with crypto/x509 and the library's report parsing: verifyTurin
// stands for verify.SnpAttestation, checkTurinReport for validate.SnpAttestation's checks of
// the report against its certificate.

// verifyTurin checks a Turin report (raw, its 1184 bytes) and its endorsement key certificate
// ek of kind key: the report's signature with ek (ECDSA P-384 with SHA-384 over the first
// 0x2A0 bytes), then, as go-sev-guest checks the certificates of the other lines, ek's
// version, algorithms, key, subject and issuer, and its chain to one of candidates at now.
// The error is a *RejectError: signature, expired or chain.
func verifyTurin(raw []byte, ek *x509.Certificate, key abi.ReportSigner, candidates []*trust.ProductCerts, now time.Time) error {
	if err := verify.SnpReportSignature(raw, ek); err != nil {
		return reject(ReasonSignature, "verifying SEV-SNP report signature: %w", err)
	}
	if err := checkTurinCertificate(ek, key); err != nil {
		return reject(ReasonChain, "checking %v certificate: %w", key, err)
	}
	var errs []error
	for _, pc := range candidates {
		opts := pc.X509Options(now, key)
		if opts == nil {
			continue
		}
		_, err := ek.Verify(*opts)
		if err == nil {
			return nil
		}
		if ie, ok := errors.AsType[x509.CertificateInvalidError](err); ok && ie.Reason == x509.Expired {
			return reject(ReasonExpired, "verifying %v certificate chain: %w", key, err)
		}
		errs = append(errs, err)
	}
	return reject(ReasonChain, "verifying %v certificate chain: %w", key, errors.Join(errs...))
}

// checkTurinCertificate checks what go-sev-guest checks of a VCEK or VLEK certificate before
// its chain: X.509 version 3, signed with RSASSA-PSS and SHA-384, an ECDSA P-384 key, AMD's
// subject (SEV-VCEK or SEV-VLEK) and a Turin intermediate as issuer.
func checkTurinCertificate(ek *x509.Certificate, key abi.ReportSigner) error {
	if ek.Version != 3 {
		return fmt.Errorf("certificate version %d, want 3", ek.Version)
	}
	if ek.SignatureAlgorithm != x509.SHA384WithRSAPSS {
		return fmt.Errorf("signature algorithm %v, want SHA-384 with RSASSA-PSS", ek.SignatureAlgorithm)
	}
	if pub, ok := ek.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P384() {
		return errors.New("public key is not ECDSA P-384")
	}
	if err := checkAMDName(ek.Subject, "SEV-"+key.String()); err != nil {
		return fmt.Errorf("subject: %w", err)
	}
	issuer := "SEV-" + snpTurin
	if key == abi.VlekReportSigner {
		issuer = "SEV-VLEK-" + snpTurin
	}
	if err := checkAMDName(ek.Issuer, issuer); err != nil {
		return fmt.Errorf("issuer: %w", err)
	}
	return nil
}

// checkAMDName checks that name is AMD's, with common name cn.
func checkAMDName(name pkix.Name, cn string) error {
	for _, f := range []struct {
		what string
		got  []string
		want string
	}{
		{"country", name.Country, "US"},
		{"locality", name.Locality, "Santa Clara"},
		{"state", name.Province, "CA"},
		{"organization", name.Organization, "Advanced Micro Devices"},
		{"organizational unit", name.OrganizationalUnit, "Engineering"},
	} {
		if len(f.got) != 1 || f.got[0] != f.want {
			return fmt.Errorf("%s %q, want %q", f.what, f.got, f.want)
		}
	}
	if name.CommonName != cn {
		return fmt.Errorf("common name %q, want %q", name.CommonName, cn)
	}
	return nil
}

// checkTurinReport checks a verified Turin report against the certificate that signed it, as
// validate.SnpAttestation does for the other lines with permissiveSNPOptions: REPORTED_TCB is
// the TCB every SPL extension of the certificate (fmcSPL too) states, byte for byte; that TCB
// is at most CURRENT_TCB, as is COMMITTED_TCB; and a VCEK's HWID is the report's CHIP_ID,
// unless the report masks it.
func checkTurinReport(r *spb.Report, exts *snpCertExtensions, key abi.ReportSigner) error {
	certTCB, err := exts.tcbVersion(snpTurin)
	if err != nil {
		return err
	}
	cert := snpTCBOf(snpTurin, certTCB)
	if r.GetReportedTcb() != certTCB {
		return fmt.Errorf("REPORTED_TCB %#016x (%v) is not the certificate's TCB %#016x (%v)", r.GetReportedTcb(), snpTCBOf(snpTurin, r.GetReportedTcb()), certTCB, cert)
	}
	current := snpTCBOf(snpTurin, r.GetCurrentTcb())
	if !tcbLE(cert, current) {
		return fmt.Errorf("the certificate's TCB %v is above CURRENT_TCB %v", cert, current)
	}
	if committed := snpTCBOf(snpTurin, r.GetCommittedTcb()); !tcbLE(committed, current) {
		return fmt.Errorf("COMMITTED_TCB %v is above CURRENT_TCB %v", committed, current)
	}
	chip := r.GetChipId()
	if key == abi.VcekReportSigner && !bytes.Equal(chip, make([]byte, len(chip))) {
		want := make([]byte, abi.ChipIDSize)
		copy(want, exts.HWID)
		if !bytes.Equal(chip, want) {
			return fmt.Errorf("CHIP_ID %x is not the VCEK's HWID %x", chip, exts.HWID)
		}
	}
	return nil
}

// checkTurinOptions checks a verified Turin report r against the guest requirements of o that
// checkSNP sets (the guest policy bits, VMPL and HOST_DATA), as validate.SnpAttestation does
// for the other lines; checkSNP compares Turin TCBs itself.
func checkTurinOptions(r *spb.Report, o *validate.Options) error {
	pol, err := abi.ParseSnpPolicy(r.GetPolicy())
	if err != nil {
		return fmt.Errorf("parsing guest policy: %w", err)
	}
	var errs []error
	for _, b := range []struct {
		name         string
		got, allowed bool
	}{
		{"DEBUG", pol.Debug, o.GuestPolicy.Debug},
		{"SMT", pol.SMT, o.GuestPolicy.SMT},
		{"MIGRATE_MA", pol.MigrateMA, o.GuestPolicy.MigrateMA},
	} {
		if b.got && !b.allowed {
			errs = append(errs, fmt.Errorf("guest policy allows %s, which is not allowed", b.name))
		}
	}
	if o.VMPL != nil && uint32(*o.VMPL) != r.GetVmpl() {
		errs = append(errs, fmt.Errorf("report VMPL %d is not %d", r.GetVmpl(), *o.VMPL))
	}
	if len(o.HostData) > 0 && !bytes.Equal(o.HostData, r.GetHostData()) {
		errs = append(errs, fmt.Errorf("HOST_DATA %x is not %x", r.GetHostData(), o.HostData))
	}
	return errors.Join(errs...)
}
