package emulate

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/uuid"

	"github.com/lethe-cc/lethe/attest"
)

// An emulated SEV-SNP platform is the chain AMD's Key Distribution Service publishes, made with
// fresh keys: an ARK (self-signed RSA root) and an ASK (RSA intermediate) per product line, and
// a VCEK (ECDSA P-384) certified by the ASK with the KDS extensions (TCB, product name, HWID)
// that go-sev-guest's verify and validate read. Reports are version 3, signed with
// crypto/rand, and returned with a certificate table as configfs-tsm returns it.

const (
	// snpRSABits is the size of the emulated ARK and ASK keys. AMD's are RSA-4096; the emulator
	// uses 3072 bits to keep start-up fast. Verification does not depend on the size.
	snpRSABits = 3072

	snpARKFile    = "ark.pem"
	snpASKFile    = "ask.pem"
	snpVCEKFile   = "vcek.pem"
	snpChipIDFile = "chip-id"

	snpRootValidity = 25 * 365 * 24 * time.Hour
	snpVCEKValidity = 7 * 365 * 24 * time.Hour
	// snpCRLValidity is how long an emulated CRL is current; loading a platform whose CRLs
	// have less than half of it left issues them again.
	snpCRLValidity = 30 * 24 * time.Hour
)

// snpProductLines are the product lines an emulated SEV-SNP platform has roots for.
var snpProductLines = []string{"Milan", "Genoa"}

// snpCPUID is the family, model and stepping an emulated report carries per product line (the
// B1 stepping of each).
var snpCPUID = map[string][3]byte{
	"Milan": {0x19, 0x01, 0x01},
	"Genoa": {0x19, 0x11, 0x01},
}

// defaultSNPTCB is the TCB an emulated platform reports when Options.TCB is nil.
var defaultSNPTCB = attest.SNPTCB{BootLoader: 3, TEE: 0, SNP: 8, Microcode: 115}

// snpPlatform is an emulated SEV-SNP platform. It is immutable once made but for its CRLs,
// which mu guards, so Attest is safe for concurrent use.
type snpPlatform struct {
	arkKey  *rsa.PrivateKey
	askKey  *rsa.PrivateKey
	vcekKey *ecdsa.PrivateKey
	// arks and asks are the certificates of the roots, by product line.
	arks, asks map[string]*x509.Certificate

	productLine string
	vcek        *x509.Certificate
	certTable   []byte
	chipID      [abi.ChipIDSize]byte
	tcb         kds.TCBVersion
	opts        Options

	mu sync.Mutex
	// revoked are the certificates (VCEKs) the emulated KDS lists as revoked; crls are its
	// ARK-signed CRLs, by product line, published where the ASK says (its CRL distribution
	// point, AMD's URL for the product line).
	revoked   []x509.RevocationListEntry
	crlNumber int64
	crls      map[string][]byte
}

func newSNP(opts Options) (Platform, error) {
	if err := snpCheckOptions(opts); err != nil {
		return nil, err
	}
	arkKey, err := rsa.GenerateKey(rand.Reader, snpRSABits)
	if err != nil {
		return nil, fmt.Errorf("making emulated ARK key: %w", err)
	}
	askKey, err := rsa.GenerateKey(rand.Reader, snpRSABits)
	if err != nil {
		return nil, fmt.Errorf("making emulated ASK key: %w", err)
	}
	vcekKey, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("making emulated VCEK key: %w", err)
	}
	p := &snpPlatform{arkKey: arkKey, askKey: askKey, vcekKey: vcekKey,
		arks: map[string]*x509.Certificate{}, asks: map[string]*x509.Certificate{}, crls: map[string][]byte{}}
	if _, err := rand.Read(p.chipID[:]); err != nil {
		return nil, fmt.Errorf("making emulated chip ID: %w", err)
	}
	now := time.Now()
	for _, line := range snpProductLines {
		if err := p.certifyRoots(line, now); err != nil {
			return nil, err
		}
	}
	if err := p.configure(opts); err != nil {
		return nil, err
	}
	if err := p.issueCRLs(now); err != nil {
		return nil, err
	}
	return p, nil
}

// loadSNP reads the platform saved under dir and applies opts to what it reports: the roots
// stay, the VCEK is certified anew for opts' TCB and chip ID (the same certificate, serial
// number included, for the same TCB and chip, as AMD's KDS serves one), and the revocations
// stay. CRLs missing or past half their validity are issued again and saved.
func loadSNP(dir string, opts Options) (Platform, error) {
	pdir := filepath.Join(dir, attest.PlatformEmulatedSEVSNP.String())
	roots, err := attest.LoadRoots(dir)
	if err != nil {
		return nil, fmt.Errorf("loading emulated SEV-SNP platform: %w", err)
	}
	p := &snpPlatform{arks: map[string]*x509.Certificate{}, asks: map[string]*x509.Certificate{}, crls: map[string][]byte{}}
	var saved attest.Roots
	for _, r := range roots {
		if r.Platform != attest.PlatformEmulatedSEVSNP {
			continue
		}
		saved = r
		for line, chain := range r.Certificates {
			ask, ark, err := kds.ParseProductCertChain(chain)
			if err != nil {
				return nil, fmt.Errorf("loading emulated SEV-SNP roots for %s: %w", line, err)
			}
			if p.asks[line], err = x509.ParseCertificate(ask); err != nil {
				return nil, fmt.Errorf("loading emulated ASK for %s: %w", line, err)
			}
			if p.arks[line], err = x509.ParseCertificate(ark); err != nil {
				return nil, fmt.Errorf("loading emulated ARK for %s: %w", line, err)
			}
		}
	}
	if len(p.arks) == 0 {
		return nil, fmt.Errorf("loading emulated SEV-SNP platform: no roots under %s", pdir)
	}
	if p.arkKey, err = snpReadRSAKey(filepath.Join(pdir, snpARKFile)); err != nil {
		return nil, err
	}
	if p.askKey, err = snpReadRSAKey(filepath.Join(pdir, snpASKFile)); err != nil {
		return nil, err
	}
	if p.vcekKey, err = snpReadECDSAKey(filepath.Join(pdir, snpVCEKFile)); err != nil {
		return nil, err
	}
	for line, ask := range p.asks {
		if !snpKeysEqual(ask.PublicKey, p.askKey.Public()) || !snpKeysEqual(p.arks[line].PublicKey, p.arkKey.Public()) {
			return nil, fmt.Errorf("loading emulated SEV-SNP platform: the keys under %s do not match its roots for %s", pdir, line)
		}
	}
	b, err := os.ReadFile(filepath.Join(pdir, snpChipIDFile))
	if err != nil {
		return nil, fmt.Errorf("loading emulated SEV-SNP platform: %w", err)
	}
	id, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(id) != abi.ChipIDSize {
		return nil, fmt.Errorf("loading emulated SEV-SNP platform: %s is not %d hex bytes", snpChipIDFile, abi.ChipIDSize)
	}
	copy(p.chipID[:], id)
	if err := p.configure(opts); err != nil {
		return nil, err
	}
	if fresh, err := p.loadCRLs(saved); err != nil {
		return nil, fmt.Errorf("loading emulated SEV-SNP platform: %w", err)
	} else if !fresh {
		if err := p.issueCRLs(time.Now()); err != nil {
			return nil, err
		}
		if err := attest.SaveRoots(dir, p.Roots()); err != nil {
			return nil, fmt.Errorf("loading emulated SEV-SNP platform: %w", err)
		}
	}
	return p, nil
}

// loadCRLs takes the revocations and CRLs of saved roots and reports whether every product
// line's CRL is there with more than half its validity left.
func (p *snpPlatform) loadCRLs(saved attest.Roots) (fresh bool, err error) {
	fresh = true
	for line := range p.arks {
		der, ok := saved.Collateral[snpCRLURL(line)]
		if !ok {
			fresh = false
			continue
		}
		crl, err := x509.ParseRevocationList(der)
		if err != nil {
			return false, fmt.Errorf("reading its %s CRL: %w", line, err)
		}
		if err := crl.CheckSignatureFrom(p.arks[line]); err != nil {
			return false, fmt.Errorf("its %s CRL is not signed by its ARK: %w", line, err)
		}
		if crl.Number != nil && crl.Number.IsInt64() && crl.Number.Int64() > p.crlNumber {
			p.crlNumber = crl.Number.Int64()
			p.revoked = crl.RevokedCertificateEntries
		}
		if time.Until(crl.NextUpdate) < snpCRLValidity/2 {
			fresh = false
		}
		p.crls[line] = der
	}
	return fresh, nil
}

// snpCRLURL is where AMD publishes the ARK-signed CRL of a product line's ASK, and where the
// emulated ASK says its CRL is.
func snpCRLURL(line string) string { return kds.CrlLinkByKey(line, abi.VcekReportSigner) }

// issueCRLs issues every product line's CRL, signed by its ARK, listing p.revoked. The caller
// holds mu or owns p alone.
func (p *snpPlatform) issueCRLs(now time.Time) error {
	p.crlNumber++
	for line, ark := range p.arks {
		der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
			Number: big.NewInt(p.crlNumber), ThisUpdate: now.Add(-time.Minute), NextUpdate: now.Add(snpCRLValidity),
			RevokedCertificateEntries: p.revoked, SignatureAlgorithm: x509.SHA384WithRSAPSS,
		}, ark, p.arkKey)
		if err != nil {
			return fmt.Errorf("issuing the emulated %s CRL: %w", line, err)
		}
		p.crls[line] = der
	}
	return nil
}

// Revoke revokes the platform's current VCEK certificate: the CRLs that Roots serves from now
// on list it, so a Verifier checking revocations with those roots rejects the platform's
// reports (ReasonRevoked), as it would a real platform whose VCEK AMD revoked. The VCEK is
// the one certified for the platform's chip ID and TCB: another chip or TCB of the same
// emulator is not revoked. Save publishes the revocation to a saved platform's directory.
func (p *snpPlatform) Revoke() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.revoked = append(p.revoked, x509.RevocationListEntry{SerialNumber: p.vcek.SerialNumber, RevocationTime: time.Now().Add(-time.Second)})
	return p.issueCRLs(time.Now())
}

func snpKeysEqual(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

// snpCheckOptions checks opts before any key is made.
func snpCheckOptions(opts Options) error {
	if _, ok := snpCPUID[opts.Product]; !ok && opts.Product != "" {
		return fmt.Errorf("emulated SEV-SNP product %q is not one of %s", opts.Product, strings.Join(snpProductLines, ", "))
	}
	if n := len(opts.Measurement); n != 0 && n != abi.MeasurementSize {
		return fmt.Errorf("emulated SEV-SNP measurement is %d bytes, want %d", n, abi.MeasurementSize)
	}
	if n := len(opts.HostData); n != 0 && n != abi.HostDataSize {
		return fmt.Errorf("emulated SEV-SNP host data is %d bytes, want %d", n, abi.HostDataSize)
	}
	if n := len(opts.ChipID); n != 0 && n != abi.ChipIDSize {
		return fmt.Errorf("emulated SEV-SNP chip ID is %d bytes, want %d", n, abi.ChipIDSize)
	}
	if opts.VMPL > 3 {
		return fmt.Errorf("emulated SEV-SNP VMPL %d is not 0-3", opts.VMPL)
	}
	return nil
}

// configure sets what the platform reports and certifies a VCEK for it.
func (p *snpPlatform) configure(opts Options) error {
	p.productLine = opts.Product
	if p.productLine == "" {
		p.productLine = "Milan"
	}
	if err := snpCheckOptions(opts); err != nil {
		return err
	}
	if p.arks[p.productLine] == nil {
		return fmt.Errorf("emulated SEV-SNP platform has no roots for %s", p.productLine)
	}
	if len(opts.ChipID) != 0 {
		copy(p.chipID[:], opts.ChipID)
	}
	tcb := defaultSNPTCB
	if opts.TCB != nil {
		tcb = *opts.TCB
	}
	v, err := kds.ComposeTCBParts(kds.TCBParts{BlSpl: tcb.BootLoader, TeeSpl: tcb.TEE, SnpSpl: tcb.SNP, UcodeSpl: tcb.Microcode})
	if err != nil {
		return fmt.Errorf("composing emulated TCB: %w", err)
	}
	p.tcb = v
	p.opts = opts
	if err := p.certifyVCEK(time.Now()); err != nil {
		return err
	}
	return nil
}

func snpAMDName(commonName string) pkix.Name {
	return pkix.Name{
		Country:            []string{"US"},
		Province:           []string{"CA"},
		Locality:           []string{"Santa Clara"},
		Organization:       []string{"Advanced Micro Devices"},
		OrganizationalUnit: []string{"Engineering"},
		CommonName:         commonName,
	}
}

func snpSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("making certificate serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

// certifyRoots makes the ARK and ASK certificates of a product line, as AMD's KDS publishes them.
func (p *snpPlatform) certifyRoots(line string, now time.Time) error {
	crl := kds.CrlLinkByKey(line, abi.VcekReportSigner)
	arkSerial, err := snpSerial()
	if err != nil {
		return err
	}
	arkTmpl := &x509.Certificate{
		SerialNumber:          arkSerial,
		Subject:               snpAMDName("ARK-" + line),
		NotBefore:             now.Add(-24 * time.Hour),
		NotAfter:              now.Add(snpRootValidity),
		SignatureAlgorithm:    x509.SHA384WithRSAPSS,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		CRLDistributionPoints: []string{crl},
	}
	der, err := x509.CreateCertificate(rand.Reader, arkTmpl, arkTmpl, p.arkKey.Public(), p.arkKey)
	if err != nil {
		return fmt.Errorf("certifying emulated ARK: %w", err)
	}
	ark, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("certifying emulated ARK: %w", err)
	}
	askSerial, err := snpSerial()
	if err != nil {
		return err
	}
	askTmpl := &x509.Certificate{
		SerialNumber:          askSerial,
		Subject:               snpAMDName("SEV-" + line),
		NotBefore:             now.Add(-24 * time.Hour),
		NotAfter:              now.Add(snpRootValidity),
		SignatureAlgorithm:    x509.SHA384WithRSAPSS,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
		CRLDistributionPoints: []string{crl},
	}
	der, err = x509.CreateCertificate(rand.Reader, askTmpl, ark, p.askKey.Public(), p.arkKey)
	if err != nil {
		return fmt.Errorf("certifying emulated ASK: %w", err)
	}
	ask, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("certifying emulated ASK: %w", err)
	}
	p.arks[line], p.asks[line] = ark, ask
	return nil
}

// snpVCEKExtensions returns the KDS extensions of a VCEK certificate.
func snpVCEKExtensions(tcb kds.TCBVersion, productName string, hwid []byte) ([]pkix.Extension, error) {
	parts := kds.DecomposeTCBVersion(tcb)
	var exts []pkix.Extension
	add := func(id asn1.ObjectIdentifier, v any, params string) error {
		b, err := asn1.MarshalWithParams(v, params)
		if err != nil {
			return fmt.Errorf("encoding VCEK extension %v: %w", id, err)
		}
		exts = append(exts, pkix.Extension{Id: id, Value: b})
		return nil
	}
	for _, e := range []struct {
		id     asn1.ObjectIdentifier
		v      any
		params string
	}{
		{kds.OidStructVersion, 0, ""},
		{kds.OidProductName1, productName, "ia5"},
		{kds.OidBlSpl, int(parts.BlSpl), ""},
		{kds.OidTeeSpl, int(parts.TeeSpl), ""},
		{kds.OidSnpSpl, int(parts.SnpSpl), ""},
		{kds.OidSpl4, int(parts.Spl4), ""},
		{kds.OidSpl5, int(parts.Spl5), ""},
		{kds.OidSpl6, int(parts.Spl6), ""},
		{kds.OidSpl7, int(parts.Spl7), ""},
		{kds.OidUcodeSpl, int(parts.UcodeSpl), ""},
		{kds.OidHwid, hwid, ""},
	} {
		if err := add(e.id, e.v, e.params); err != nil {
			return nil, err
		}
	}
	return exts, nil
}

// vcekSerial is the serial number of the VCEK certificate for the platform's key, product,
// chip ID and TCB: the same every time they are the same, as AMD's KDS serves one certificate
// per chip and TCB, so that a revocation names every process that signs as that chip.
func (p *snpPlatform) vcekSerial(productName string) *big.Int {
	h := sha256.New()
	h.Write([]byte("lethe emulated VCEK serial\x00"))
	pub, err := p.vcekKey.PublicKey.Bytes()
	if err != nil {
		panic(fmt.Sprintf("encoding a P-384 public key: %v", err))
	}
	h.Write(pub)
	h.Write([]byte(productName + "\x00"))
	h.Write(p.chipID[:])
	var tcb [8]byte
	binary.BigEndian.PutUint64(tcb[:], uint64(p.tcb))
	h.Write(tcb[:])
	serial := new(big.Int).SetBytes(h.Sum(nil)[:16])
	return serial.Add(serial.Rsh(serial, 1), big.NewInt(1)) // positive, below 2^127 + 1
}

// certifyVCEK certifies the VCEK key for the configured product, TCB and chip ID.
func (p *snpPlatform) certifyVCEK(now time.Time) error {
	fms := snpCPUID[p.productLine]
	productName := kds.ProductName(abi.SevProductFromCpuid1Eax(abi.FmsToCpuid1Eax(fms[0], fms[1], fms[2])))
	exts, err := snpVCEKExtensions(p.tcb, productName, p.chipID[:])
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:       p.vcekSerial(productName),
		Subject:            snpAMDName("SEV-VCEK"),
		NotBefore:          now.Add(-24 * time.Hour),
		NotAfter:           now.Add(snpVCEKValidity),
		SignatureAlgorithm: x509.SHA384WithRSAPSS,
		ExtraExtensions:    exts,
	}
	ask := p.asks[p.productLine]
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ask, p.vcekKey.Public(), p.askKey)
	if err != nil {
		return fmt.Errorf("certifying emulated VCEK: %w", err)
	}
	if p.vcek, err = x509.ParseCertificate(der); err != nil {
		return fmt.Errorf("certifying emulated VCEK: %w", err)
	}
	table := &abi.CertTable{Entries: []abi.CertTableEntry{
		{GUID: uuid.MustParse(abi.ArkGUID), RawCert: p.arks[p.productLine].Raw},
		{GUID: uuid.MustParse(abi.AskGUID), RawCert: ask.Raw},
		{GUID: uuid.MustParse(abi.VcekGUID), RawCert: p.vcek.Raw},
	}}
	p.certTable = table.Marshal()
	return nil
}

// Platform implements attest.Attester.
func (p *snpPlatform) Platform() attest.Platform { return attest.PlatformEmulatedSEVSNP }

// Attest returns a signed version 3 attestation report for reportData followed by a certificate
// table holding the ARK, ASK and VCEK, as configfs-tsm returns them.
func (p *snpPlatform) Attest(ctx context.Context, reportData [attest.ReportDataSize]byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fms := snpCPUID[p.productLine]
	reportIDMA := make([]byte, abi.ReportIDMASize)
	if !p.opts.MigrateMA {
		// No migration agent is bound: the firmware reports all ones.
		for i := range reportIDMA {
			reportIDMA[i] = 0xff
		}
	}
	reportID := make([]byte, abi.ReportIDSize)
	if _, err := rand.Read(reportID); err != nil {
		return nil, fmt.Errorf("making report ID: %w", err)
	}
	r := &spb.Report{
		Version:  abi.ReportVersion3,
		GuestSvn: 1,
		Policy: abi.SnpPolicyToBytes(abi.SnpPolicy{
			ABIMajor: 1, ABIMinor: 55, SMT: true, MigrateMA: p.opts.MigrateMA, Debug: p.opts.Debug,
		}),
		FamilyId:        make([]byte, abi.FamilyIDSize),
		ImageId:         make([]byte, abi.ImageIDSize),
		Vmpl:            p.opts.VMPL,
		SignatureAlgo:   abi.SignEcdsaP384Sha384,
		CurrentTcb:      uint64(p.tcb),
		PlatformInfo:    1, // SMT enabled
		SignerInfo:      abi.ComposeSignerInfo(abi.SignerInfo{SigningKey: abi.VcekReportSigner}),
		ReportData:      reportData[:],
		Measurement:     snpFixed(p.opts.Measurement, abi.MeasurementSize),
		HostData:        snpFixed(p.opts.HostData, abi.HostDataSize),
		IdKeyDigest:     make([]byte, abi.IDKeyDigestSize),
		AuthorKeyDigest: make([]byte, abi.AuthorKeyDigestSize),
		ReportId:        reportID,
		ReportIdMa:      reportIDMA,
		ReportedTcb:     uint64(p.tcb),
		Cpuid1EaxFms:    abi.FmsToCpuid1Eax(fms[0], fms[1], fms[2]),
		ChipId:          p.chipID[:],
		CommittedTcb:    uint64(p.tcb),
		CurrentBuild:    21,
		CurrentMinor:    55,
		CurrentMajor:    1,
		CommittedBuild:  21,
		CommittedMinor:  55,
		CommittedMajor:  1,
		LaunchTcb:       uint64(p.tcb),
		Signature:       make([]byte, abi.SignatureSize),
	}
	report, err := abi.ReportToAbiBytes(r)
	if err != nil {
		return nil, fmt.Errorf("encoding emulated report: %w", err)
	}
	digest := crypto.SHA384.New()
	digest.Write(abi.SignedComponent(report))
	sigR, sigS, err := ecdsa.Sign(rand.Reader, p.vcekKey, digest.Sum(nil))
	if err != nil {
		return nil, fmt.Errorf("signing emulated report: %w", err)
	}
	if err := abi.SetSignature(sigR, sigS, report); err != nil {
		return nil, fmt.Errorf("signing emulated report: %w", err)
	}
	return append(report, p.certTable...), nil
}

// fixed returns b zero-padded to n bytes (b is at most n bytes; configure checks).
func snpFixed(b []byte, n int) []byte {
	out := make([]byte, n)
	copy(out, b)
	return out
}

// Roots returns the ARK and ASK of every product line, in the KDS cert_chain format (ASK then
// ARK, PEM), keyed by product line, and the emulated KDS's CRLs as collateral.
func (p *snpPlatform) Roots() attest.Roots {
	certs := map[string][]byte{}
	for line, ark := range p.arks {
		chain := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.asks[line].Raw})
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ark.Raw})...)
		certs[line] = chain
	}
	p.mu.Lock()
	coll := make(map[string][]byte, len(p.crls))
	for line, der := range p.crls {
		coll[snpCRLURL(line)] = bytes.Clone(der)
	}
	p.mu.Unlock()
	return attest.Roots{Platform: attest.PlatformEmulatedSEVSNP, Certificates: certs, Collateral: coll}
}

// Save writes the ARK, ASK and VCEK keys (PKCS #8 PEM, mode 0600) and the chip ID under
// dir/emulated-sev-snp/, and the roots with attest.SaveRoots.
func (p *snpPlatform) Save(dir string) error {
	pdir := filepath.Join(dir, attest.PlatformEmulatedSEVSNP.String())
	if err := os.MkdirAll(pdir, 0o700); err != nil {
		return fmt.Errorf("saving emulated SEV-SNP platform: %w", err)
	}
	for name, key := range map[string]crypto.PrivateKey{snpARKFile: p.arkKey, snpASKFile: p.askKey, snpVCEKFile: p.vcekKey} {
		if err := snpWriteKey(filepath.Join(pdir, name), key); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(pdir, snpChipIDFile), []byte(hex.EncodeToString(p.chipID[:])+"\n"), 0o644); err != nil {
		return fmt.Errorf("saving emulated SEV-SNP platform: %w", err)
	}
	if err := attest.SaveRoots(dir, p.Roots()); err != nil {
		return fmt.Errorf("saving emulated SEV-SNP platform: %w", err)
	}
	return nil
}

func snpWriteKey(path string, key crypto.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encoding %s: %w", filepath.Base(path), err)
	}
	b := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", filepath.Base(path), err)
	}
	// WriteFile keeps the mode of a file that exists: make sure it is private.
	if err := os.Chmod(path, 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", filepath.Base(path), err)
	}
	return nil
}

func snpReadKey(path string) (crypto.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading key: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("reading key %s: no PRIVATE KEY PEM block", filepath.Base(path))
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("reading key %s: %w", filepath.Base(path), err)
	}
	return key, nil
}

func snpReadRSAKey(path string) (*rsa.PrivateKey, error) {
	key, err := snpReadKey(path)
	if err != nil {
		return nil, err
	}
	k, ok := key.(*rsa.PrivateKey)
	if !ok {
		return nil, errors.New("reading key " + filepath.Base(path) + ": not an RSA key")
	}
	return k, nil
}

func snpReadECDSAKey(path string) (*ecdsa.PrivateKey, error) {
	key, err := snpReadKey(path)
	if err != nil {
		return nil, err
	}
	k, ok := key.(*ecdsa.PrivateKey)
	if !ok || k.Curve != elliptic.P384() {
		return nil, errors.New("reading key " + filepath.Base(path) + ": not an ECDSA P-384 key")
	}
	return k, nil
}
