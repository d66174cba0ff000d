package emulate

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tdx-guest/abi"
	"github.com/google/go-tdx-guest/pcs"
	pb "github.com/google/go-tdx-guest/proto/tdx"

	"github.com/lethe-cc/lethe/attest"
)

// TDXRootCRLURL is where the emulated TDX root certificate says its CRL is published; the
// emulated PCS serves it there (in Roots().Collateral), as Intel serves its root CA's CRL.
const TDXRootCRLURL = "https://emulated-tdx.lethe.invalid/rootcrl.der"

// What an emulated TDX platform reports unless Options say otherwise.
var (
	// defaultTEETCBSVN is the TEE TCB SVN: TDX module SVN 5 of major version 1, then the
	// platform's components.
	defaultTEETCBSVN = []byte{0x05, 0x01, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	defaultFMSPC     = []byte{0x90, 0xc0, 0x6f, 0x00, 0x00, 0x00}
	// defaultTDAttributes sets SEPT_VE_DISABLE (bit 28) only.
	defaultTDAttributes = []byte{0, 0, 0, 0x10, 0, 0, 0, 0}
	// defaultXFAM enables x87, SSE, AVX, AVX-512 and AMX state.
	defaultXFAM = []byte{0xe7, 0x18, 0x06, 0, 0, 0, 0, 0}
	// intelQEVendorID is the QE_VENDOR_ID of Intel's quoting enclave.
	intelQEVendorID = []byte{0x93, 0x9a, 0x72, 0x33, 0xf7, 0x9c, 0x4c, 0xa9, 0x94, 0x0a, 0x0d, 0xb3, 0x95, 0x7f, 0x06, 0x07}
	// The emulated platform's SGX TCB (in its PCK certificate) and quoting enclave.
	tdxCPUSVN    = []byte{5, 5, 2, 2, 4, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0}
	tdxPCEID     = []byte{0, 0}
	qeAttributes = []byte{0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
)

const (
	tdxPCESVN    = 13
	tdxQESVN     = 8
	tdxQEProdID  = 2
	tdxTeeTDX    = 0x81
	qeReportSize = 0x180
	sgxRootName  = "Intel SGX Root CA"
	sgxCAName    = "Intel SGX PCK Platform CA"
	sgxPCKName   = "Intel SGX PCK Certificate"
	sgxTCBName   = "Intel SGX TCB Signing"
	emulatedOrg  = "Lethe emulated TDX platform (not Intel)"
	keyFileMode  = 0o600
	tdxKeyRoot   = "root"
	tdxKeyCA     = "pck-platform-ca"
	tdxKeyTCB    = "tcb-signing"
	tdxKeyPCK    = "pck"
	tdxKeyAK     = "attestation"
	rootCertName = "root"
)

// Validity of what the emulated platform issues. Collateral lives 30 days, as Intel's does;
// loading a saved platform re-issues it.
const (
	rootValidity       = 20 * 365 * 24 * time.Hour
	caValidity         = 15 * 365 * 24 * time.Hour
	leafValidity       = 7 * 365 * 24 * time.Hour
	collateralValidity = 30 * 24 * time.Hour
)

// tdxOptions are Options normalized for TDX: every field at its size.
type tdxOptions struct {
	debug     bool
	mrtd      []byte
	rtmrs     [4][]byte
	teeTCBSVN []byte
	fmspc     []byte
	mrseam    []byte
	chipID    []byte // nil: the PPID derives from the PCK key
}

func tdxOptionsOf(o Options) (tdxOptions, error) {
	t := tdxOptions{debug: o.Debug, chipID: bytes.Clone(o.ChipID)}
	sized := func(name string, b []byte, size int, def []byte) ([]byte, error) {
		if len(b) == 0 {
			return bytes.Clone(def), nil
		}
		if len(b) != size {
			return nil, fmt.Errorf("emulating TDX: %s is %d bytes, want %d", name, len(b), size)
		}
		return bytes.Clone(b), nil
	}
	var err error
	mrtd := o.MRTD
	if len(mrtd) == 0 {
		mrtd = o.Measurement
	}
	if t.mrtd, err = sized("MRTD", mrtd, abi.MrTdSize, make([]byte, abi.MrTdSize)); err != nil {
		return t, err
	}
	for i := range t.rtmrs {
		if t.rtmrs[i], err = sized(fmt.Sprintf("RTMR%d", i), o.RTMRs[i], abi.RtmrSize, make([]byte, abi.RtmrSize)); err != nil {
			return t, err
		}
	}
	if t.teeTCBSVN, err = sized("TEE TCB SVN", o.TEETCBSVN, abi.TeeTcbSvnSize, defaultTEETCBSVN); err != nil {
		return t, err
	}
	if t.fmspc, err = sized("FMSPC", o.FMSPC, 6, defaultFMSPC); err != nil {
		return t, err
	}
	defSeam := sha512.Sum384([]byte("lethe emulated TDX module"))
	if t.mrseam, err = sized("MRSEAM", o.MRSEAM, abi.MrSeamSize, defSeam[:]); err != nil {
		return t, err
	}
	return t, nil
}

// TDX is an emulated TDX platform: a TD quote v4 signer with its own PCK chain (PCK → PCK
// Platform CA → root), quoting-enclave attestation key, and a fake Intel PCS that serves signed
// TCB info, QE identity and CRLs for it, all under a root of its own. Safe for concurrent use.
//
// Its certificates carry the common names go-tdx-guest requires of Intel's ("Intel SGX Root
// CA", …) and the organization "Lethe emulated TDX platform (not Intel)"; they chain to nothing
// but the emulator's root, which only a Verifier configured with Roots() trusts.
type TDX struct {
	mu   sync.Mutex
	opts tdxOptions
	keys map[string]*ecdsa.PrivateKey
	// certificates by key name: root, pck-platform-ca, tcb-signing, pck.
	certs      map[string]*x509.Certificate
	revoked    []x509.RevocationListEntry
	crlNumber  int64
	collateral map[string][]byte
	// qeCert is the quote's certification data, which does not depend on the TD report.
	qeCert *pb.QEReportCertificationData
}

var _ Platform = (*TDX)(nil)

func newTDX(opts Options) (Platform, error) {
	o, err := tdxOptionsOf(opts)
	if err != nil {
		return nil, err
	}
	e := &TDX{opts: o, keys: map[string]*ecdsa.PrivateKey{}, certs: map[string]*x509.Certificate{}, collateral: map[string][]byte{}}
	for _, name := range []string{tdxKeyRoot, tdxKeyCA, tdxKeyTCB, tdxKeyPCK, tdxKeyAK} {
		if e.keys[name], err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			return nil, fmt.Errorf("emulating TDX: generating keys: %w", err)
		}
	}
	now := time.Now().UTC().Truncate(time.Second)
	if err := e.issueCAs(now); err != nil {
		return nil, err
	}
	if err := e.issuePCK(now); err != nil {
		return nil, err
	}
	if err := e.issueCollateral(now); err != nil {
		return nil, err
	}
	return e, nil
}

// Platform implements attest.Attester.
func (e *TDX) Platform() attest.Platform { return attest.PlatformEmulatedTDX }

// Roots returns the emulator's root certificate and the collateral its PCS serves, keyed by
// the URLs go-tdx-guest requests them at (Intel PCS's for TCB info, QE identity and the PCK
// CRL; TDXRootCRLURL for the root CA's CRL), with each document's response headers under the
// key plus attest.CollateralHeadersSuffix.
func (e *TDX) Roots() attest.Roots {
	e.mu.Lock()
	defer e.mu.Unlock()
	coll := make(map[string][]byte, len(e.collateral))
	for k, v := range e.collateral {
		coll[k] = bytes.Clone(v)
	}
	return attest.Roots{
		Platform:     attest.PlatformEmulatedTDX,
		Certificates: map[string][]byte{rootCertName: certPEM(e.certs[tdxKeyRoot])},
		Collateral:   coll,
	}
}

// Revoke implements Platform: it revokes the PCK certificate (RevokePCK).
func (e *TDX) Revoke() error { return e.RevokePCK() }

// RevokePCK revokes the platform's current PCK certificate: the PCK CRL that Roots serves from
// now on lists it, so a Verifier checking revocations with those roots rejects the platform's
// quotes (as it would a real platform whose PCK Intel revoked).
func (e *TDX) RevokePCK() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := time.Now().UTC().Truncate(time.Second)
	e.revoked = append(e.revoked, x509.RevocationListEntry{SerialNumber: e.certs[tdxKeyPCK].SerialNumber, RevocationTime: now})
	return e.issuePCKCRL(now)
}

// Attest implements attest.Attester: it returns a TD quote v4 carrying reportData.
func (e *TDX) Attest(ctx context.Context, reportData [attest.ReportDataSize]byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	e.mu.Lock()
	o, ak, qeCert := e.opts, e.keys[tdxKeyAK], e.qeCert
	e.mu.Unlock()

	attrs := bytes.Clone(defaultTDAttributes)
	if o.debug {
		attrs[0] |= 0x01
	}
	body := &pb.TDQuoteBody{
		TeeTcbSvn:      o.teeTCBSVN,
		MrSeam:         o.mrseam,
		MrSignerSeam:   make([]byte, 48),
		SeamAttributes: make([]byte, 8),
		TdAttributes:   attrs,
		Xfam:           defaultXFAM,
		MrTd:           o.mrtd,
		MrConfigId:     make([]byte, 48),
		MrOwner:        make([]byte, 48),
		MrOwnerConfig:  make([]byte, 48),
		Rtmrs:          [][]byte{o.rtmrs[0], o.rtmrs[1], o.rtmrs[2], o.rtmrs[3]},
		ReportData:     reportData[:],
	}
	header := &pb.Header{
		Version:            abi.QuoteVersion,
		AttestationKeyType: abi.AttestationKeyType,
		TeeType:            tdxTeeTDX,
		PceSvn:             binary.LittleEndian.AppendUint16(nil, tdxPCESVN),
		QeSvn:              binary.LittleEndian.AppendUint16(nil, tdxQESVN),
		QeVendorId:         intelQEVendorID,
		UserData:           make([]byte, 20),
	}
	hb, err := abi.HeaderToAbiBytes(header)
	if err != nil {
		return nil, fmt.Errorf("emulating TDX quote: %w", err)
	}
	bb, err := abi.TdQuoteBodyToAbiBytes(body)
	if err != nil {
		return nil, fmt.Errorf("emulating TDX quote: %w", err)
	}
	sig, err := signRaw(ak, append(hb, bb...))
	if err != nil {
		return nil, fmt.Errorf("emulating TDX quote: %w", err)
	}
	certSize := uint32(qeReportSize) + 64 + 2 + uint32(len(qeCert.GetQeAuthData().GetData())) + 6 + qeCert.GetPckCertificateChainData().GetSize()
	quote := &pb.QuoteV4{
		Header:         header,
		TdQuoteBody:    body,
		SignedDataSize: 64 + 64 + 6 + certSize,
		SignedData: &pb.Ecdsa256BitQuoteV4AuthData{
			Signature:           sig,
			EcdsaAttestationKey: rawPublicKey(&ak.PublicKey),
			CertificationData: &pb.CertificationData{
				CertificateDataType:       6, // QE report certification data
				Size:                      certSize,
				QeReportCertificationData: qeCert,
			},
		},
	}
	raw, err := abi.QuoteToAbiBytes(quote)
	if err != nil {
		return nil, fmt.Errorf("emulating TDX quote: %w", err)
	}
	return raw, nil
}

// signRaw signs SHA-256(msg) and returns r ‖ s, 32 bytes each, as quotes carry signatures.
func signRaw(k *ecdsa.PrivateKey, msg []byte) ([]byte, error) {
	d := sha256.Sum256(msg)
	r, s, err := ecdsa.Sign(rand.Reader, k, d[:])
	if err != nil {
		return nil, fmt.Errorf("signing: %w", err)
	}
	out := make([]byte, 64)
	r.FillBytes(out[:32])
	s.FillBytes(out[32:])
	return out, nil
}

// rawPublicKey returns X ‖ Y, 32 bytes each.
func rawPublicKey(k *ecdsa.PublicKey) []byte {
	b, err := k.Bytes() // 0x04 ‖ X ‖ Y
	if err != nil {
		panic(fmt.Sprintf("encoding a P-256 public key: %v", err))
	}
	return b[1:]
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func serialNumber() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("drawing a serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil
}

func subject(cn string) pkix.Name {
	return pkix.Name{CommonName: cn, Organization: []string{emulatedOrg}}
}

func (e *TDX) issue(tmpl *x509.Certificate, parent string, pub *ecdsa.PublicKey) (*x509.Certificate, error) {
	if tmpl.SerialNumber == nil {
		sn, err := serialNumber()
		if err != nil {
			return nil, err
		}
		tmpl.SerialNumber = sn
	}
	tmpl.SignatureAlgorithm = x509.ECDSAWithSHA256
	skid := sha256.Sum256(rawPublicKey(pub))
	tmpl.SubjectKeyId = skid[:20]
	parentCert := tmpl
	if parent != "" {
		parentCert = e.certs[parent]
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parentCert, pub, e.keys[signerOf(parent)])
	if err != nil {
		return nil, fmt.Errorf("issuing %q: %w", tmpl.Subject.CommonName, err)
	}
	return x509.ParseCertificate(der)
}

// signerOf returns the key that signs for the certificate named parent ("" is self-signed by
// the root).
func signerOf(parent string) string {
	if parent == "" {
		return tdxKeyRoot
	}
	return parent
}

// issueCAs issues the root, the PCK platform CA and the TCB signing certificate.
func (e *TDX) issueCAs(now time.Time) error {
	var err error
	if e.certs[tdxKeyRoot], err = e.issue(&x509.Certificate{
		Subject: subject(sgxRootName), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(rootValidity),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true, MaxPathLen: 1,
		CRLDistributionPoints: []string{TDXRootCRLURL},
	}, "", &e.keys[tdxKeyRoot].PublicKey); err != nil {
		return fmt.Errorf("emulating TDX: %w", err)
	}
	if e.certs[tdxKeyCA], err = e.issue(&x509.Certificate{
		Subject: subject(sgxCAName), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(caValidity),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true,
		CRLDistributionPoints: []string{TDXRootCRLURL},
	}, tdxKeyRoot, &e.keys[tdxKeyCA].PublicKey); err != nil {
		return fmt.Errorf("emulating TDX: %w", err)
	}
	if e.certs[tdxKeyTCB], err = e.issue(&x509.Certificate{
		Subject: subject(sgxTCBName), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(leafValidity),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageContentCommitment, BasicConstraintsValid: true,
		CRLDistributionPoints: []string{TDXRootCRLURL},
	}, tdxKeyRoot, &e.keys[tdxKeyTCB].PublicKey); err != nil {
		return fmt.Errorf("emulating TDX: %w", err)
	}
	return nil
}

// sgxExtension encodes the PCK certificate's SGX extensions (OID 1.2.840.113741.1.13.1): PPID,
// TCB (16 CPU SVN components, PCESVN, CPUSVN), PCE-ID, FMSPC and SGX type.
func sgxExtension(ppid, fmspc []byte) (pkix.Extension, error) {
	type octets struct {
		ID    asn1.ObjectIdentifier
		Value []byte
	}
	type integer struct {
		ID    asn1.ObjectIdentifier
		Value int
	}
	type enumerated struct {
		ID    asn1.ObjectIdentifier
		Value asn1.Enumerated
	}
	type sequence struct {
		ID    asn1.ObjectIdentifier
		Value []asn1.RawValue
	}
	raw := func(v any) (asn1.RawValue, error) {
		b, err := asn1.Marshal(v)
		return asn1.RawValue{FullBytes: b}, err
	}
	var errs []error
	add := func(list *[]asn1.RawValue, v any) {
		r, err := raw(v)
		errs = append(errs, err)
		*list = append(*list, r)
	}
	var tcb []asn1.RawValue
	for i, svn := range tdxCPUSVN {
		add(&tcb, integer{slices.Concat(pcs.OidTCB, asn1.ObjectIdentifier{i + 1}), int(svn)})
	}
	add(&tcb, integer{pcs.OidPCESvn, tdxPCESVN})
	add(&tcb, octets{pcs.OidCPUSvn, tdxCPUSVN})
	var sgx []asn1.RawValue
	add(&sgx, octets{pcs.OidPPID, ppid})
	add(&sgx, sequence{pcs.OidTCB, tcb})
	add(&sgx, octets{pcs.OidPCEID, tdxPCEID})
	add(&sgx, octets{pcs.OidFMSPC, fmspc})
	add(&sgx, enumerated{asn1.ObjectIdentifier{1, 2, 840, 113741, 1, 13, 1, 5}, 1}) // SGX type: scalable
	val, err := asn1.Marshal(sgx)
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return pkix.Extension{}, fmt.Errorf("encoding SGX extensions: %w", err)
	}
	return pkix.Extension{Id: pcs.OidSgxExtension, Value: val}, nil
}

// issuePCK issues the PCK certificate for the current FMSPC and rebuilds the certification
// data every quote carries: the QE report (binding the attestation key) signed by the PCK key,
// and the PCK chain.
func (e *TDX) issuePCK(now time.Time) error {
	ppid := e.ppid()
	ext, err := sgxExtension(ppid, e.opts.fmspc)
	if err != nil {
		return fmt.Errorf("emulating TDX: %w", err)
	}
	// Six extensions, as go-tdx-guest requires of a PCK certificate: authority and subject key
	// IDs, key usage, basic constraints, CRL distribution point, SGX extensions.
	if e.certs[tdxKeyPCK], err = e.issue(&x509.Certificate{
		SerialNumber: e.pckSerial(ppid),
		Subject:      subject(sgxPCKName), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(leafValidity),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageContentCommitment, BasicConstraintsValid: true,
		CRLDistributionPoints: []string{pcs.PckCrlURL("platform")},
		ExtraExtensions:       []pkix.Extension{ext},
	}, tdxKeyCA, &e.keys[tdxKeyPCK].PublicKey); err != nil {
		return fmt.Errorf("emulating TDX: %w", err)
	}
	return e.buildQECert()
}

// ppid is the platform's PPID: from its chip ID, else from its PCK key.
func (e *TDX) ppid() []byte {
	if len(e.opts.chipID) > 0 {
		d := sha256.Sum256(append([]byte("lethe emulated TDX PPID\x00"), e.opts.chipID...))
		return d[:16]
	}
	d := sha256.Sum256(rawPublicKey(&e.keys[tdxKeyPCK].PublicKey))
	return d[:16]
}

// pckSerial is the serial number of the PCK certificate for the platform's PCK key, PPID and
// FMSPC: the same every time they are the same, so that a revocation names every process
// that signs as that platform, whichever issued the certificate last.
func (e *TDX) pckSerial(ppid []byte) *big.Int {
	d := sha256.Sum256(slices.Concat([]byte("lethe emulated PCK serial\x00"), rawPublicKey(&e.keys[tdxKeyPCK].PublicKey), ppid, e.opts.fmspc))
	n := new(big.Int).SetBytes(d[:16])
	return n.Add(n.Rsh(n, 1), big.NewInt(1))
}

func (e *TDX) qeMRSigner() []byte {
	d := sha256.Sum256(rawPublicKey(&e.keys[tdxKeyRoot].PublicKey))
	return d[:]
}

func (e *TDX) buildQECert() error {
	authData := make([]byte, 32)
	for i := range authData {
		authData[i] = byte(i)
	}
	bound := sha256.Sum256(append(rawPublicKey(&e.keys[tdxKeyAK].PublicKey), authData...))
	mrenclave := sha256.Sum256([]byte("lethe emulated TD quoting enclave"))
	report := &pb.EnclaveReport{
		CpuSvn:     tdxCPUSVN,
		Reserved1:  make([]byte, 28),
		Attributes: qeAttributes,
		MrEnclave:  mrenclave[:],
		Reserved2:  make([]byte, 32),
		MrSigner:   e.qeMRSigner(),
		Reserved3:  make([]byte, 96),
		IsvProdId:  tdxQEProdID,
		IsvSvn:     tdxQESVN,
		Reserved4:  make([]byte, 60),
		ReportData: append(bound[:], make([]byte, 32)...),
	}
	rb, err := abi.EnclaveReportToAbiBytes(report)
	if err != nil {
		return fmt.Errorf("emulating TDX QE report: %w", err)
	}
	sig, err := signRaw(e.keys[tdxKeyPCK], rb)
	if err != nil {
		return fmt.Errorf("emulating TDX QE report: %w", err)
	}
	chain := slices.Concat(certPEM(e.certs[tdxKeyPCK]), certPEM(e.certs[tdxKeyCA]), certPEM(e.certs[tdxKeyRoot]))
	e.qeCert = &pb.QEReportCertificationData{
		QeReport:          report,
		QeReportSignature: sig,
		QeAuthData:        &pb.QeAuthData{ParsedDataSize: uint32(len(authData)), Data: authData},
		PckCertificateChainData: &pb.PCKCertificateChainData{
			CertificateDataType: 5, // PCK certificate chain, PEM
			Size:                uint32(len(chain)),
			PckCertChain:        chain,
		},
	}
	return nil
}

// The PCS documents, as Intel PCS's API v4 serves them.
type (
	pcsTCBComponent struct {
		SVN byte `json:"svn"`
	}
	pcsTCB struct {
		SGX    []pcsTCBComponent `json:"sgxtcbcomponents,omitempty"`
		PCESVN uint16            `json:"pcesvn"`
		TDX    []pcsTCBComponent `json:"tdxtcbcomponents,omitempty"`
		ISVSVN uint32            `json:"isvsvn"`
	}
	pcsTCBLevel struct {
		TCB       pcsTCB `json:"tcb"`
		TCBDate   string `json:"tcbDate"`
		TCBStatus string `json:"tcbStatus"`
	}
	pcsTDXModule struct {
		MRSigner       string `json:"mrsigner"`
		Attributes     string `json:"attributes"`
		AttributesMask string `json:"attributesMask"`
	}
	pcsTDXModuleIdentity struct {
		ID             string        `json:"id"`
		MRSigner       string        `json:"mrsigner"`
		Attributes     string        `json:"attributes"`
		AttributesMask string        `json:"attributesMask"`
		TCBLevels      []pcsTCBLevel `json:"tcbLevels"`
	}
	pcsTCBInfo struct {
		ID                      string                 `json:"id"`
		Version                 int                    `json:"version"`
		IssueDate               time.Time              `json:"issueDate"`
		NextUpdate              time.Time              `json:"nextUpdate"`
		FMSPC                   string                 `json:"fmspc"`
		PCEID                   string                 `json:"pceId"`
		TCBType                 int                    `json:"tcbType"`
		TCBEvaluationDataNumber int                    `json:"tcbEvaluationDataNumber"`
		TDXModule               pcsTDXModule           `json:"tdxModule"`
		TDXModuleIdentities     []pcsTDXModuleIdentity `json:"tdxModuleIdentities,omitempty"`
		TCBLevels               []pcsTCBLevel          `json:"tcbLevels"`
	}
	pcsEnclaveIdentity struct {
		ID                      string        `json:"id"`
		Version                 int           `json:"version"`
		IssueDate               time.Time     `json:"issueDate"`
		NextUpdate              time.Time     `json:"nextUpdate"`
		TCBEvaluationDataNumber int           `json:"tcbEvaluationDataNumber"`
		MiscSelect              string        `json:"miscselect"`
		MiscSelectMask          string        `json:"miscselectMask"`
		Attributes              string        `json:"attributes"`
		AttributesMask          string        `json:"attributesMask"`
		MRSigner                string        `json:"mrsigner"`
		ISVProdID               uint16        `json:"isvprodid"`
		TCBLevels               []pcsTCBLevel `json:"tcbLevels"`
	}
)

func components(svns []byte) []pcsTCBComponent {
	out := make([]pcsTCBComponent, len(svns))
	for i, s := range svns {
		out[i] = pcsTCBComponent{SVN: s}
	}
	return out
}

// issueCollateral issues TCB info for the current FMSPC, the QE identity and both CRLs.
func (e *TDX) issueCollateral(now time.Time) error {
	if err := e.issueTCBInfo(now); err != nil {
		return err
	}
	if err := e.issueQEIdentity(now); err != nil {
		return err
	}
	if err := e.issuePCKCRL(now); err != nil {
		return err
	}
	return e.issueRootCRL(now)
}

// signedDocument returns {"<field>": doc, "signature": hex(r ‖ s)} with the signature over the
// exact bytes of doc, as Intel PCS signs.
func (e *TDX) signedDocument(field string, doc any) ([]byte, error) {
	body, err := json.Marshal(doc)
	if err != nil {
		return nil, fmt.Errorf("encoding %s: %w", field, err)
	}
	sig, err := signRaw(e.keys[tdxKeyTCB], body)
	if err != nil {
		return nil, fmt.Errorf("signing %s: %w", field, err)
	}
	return fmt.Appendf(nil, `{%q:%s,"signature":%q}`, field, body, hex.EncodeToString(sig)), nil
}

// publish serves body at rawURL with an issuer chain (signer, root) in the named header.
func (e *TDX) publish(rawURL, header string, signer string, body []byte) error {
	e.collateral[rawURL] = body
	if header == "" {
		delete(e.collateral, rawURL+attest.CollateralHeadersSuffix)
		return nil
	}
	chain := string(certPEM(e.certs[signer])) + string(certPEM(e.certs[tdxKeyRoot]))
	hb, err := json.Marshal(map[string]map[string][]string{"headers": {header: {url.QueryEscape(chain)}}})
	if err != nil {
		return fmt.Errorf("encoding headers of %s: %w", rawURL, err)
	}
	e.collateral[rawURL+attest.CollateralHeadersSuffix] = hb
	return nil
}

func (e *TDX) issueTCBInfo(now time.Time) error {
	svn := e.opts.teeTCBSVN
	date := now.Format(time.RFC3339)
	zeros := make([]byte, 16)
	info := pcsTCBInfo{
		ID: "TDX", Version: 3, IssueDate: now, NextUpdate: now.Add(collateralValidity),
		FMSPC: hex.EncodeToString(e.opts.fmspc), PCEID: hex.EncodeToString(tdxPCEID), TCBEvaluationDataNumber: 1,
		TDXModule: pcsTDXModule{MRSigner: strings.Repeat("00", 48), Attributes: "0000000000000000", AttributesMask: "FFFFFFFFFFFFFFFF"},
		TCBLevels: []pcsTCBLevel{
			{TCB: pcsTCB{SGX: components(tdxCPUSVN), PCESVN: tdxPCESVN, TDX: components(svn)}, TCBDate: date, TCBStatus: string(pcs.TcbComponentStatusUpToDate)},
			{TCB: pcsTCB{SGX: components(zeros), TDX: components(zeros)}, TCBDate: date, TCBStatus: string(pcs.TcbComponentStatusOutOfDate)},
		},
	}
	if svn[1] > 0 {
		// A TDX module of a major version above 0 is rated by its own identity.
		info.TDXModuleIdentities = []pcsTDXModuleIdentity{{
			ID: "TDX_" + hex.EncodeToString(svn[1:2]), MRSigner: strings.Repeat("00", 48),
			Attributes: "0000000000000000", AttributesMask: "FFFFFFFFFFFFFFFF",
			TCBLevels: []pcsTCBLevel{
				{TCB: pcsTCB{ISVSVN: uint32(svn[0])}, TCBDate: date, TCBStatus: string(pcs.TcbComponentStatusUpToDate)},
				{TCB: pcsTCB{ISVSVN: 0}, TCBDate: date, TCBStatus: string(pcs.TcbComponentStatusOutOfDate)},
			},
		}}
	}
	body, err := e.signedDocument("tcbInfo", info)
	if err != nil {
		return fmt.Errorf("emulating TDX PCS: %w", err)
	}
	return e.publish(pcs.TcbInfoURL(hex.EncodeToString(e.opts.fmspc)), "Tcb-Info-Issuer-Chain", tdxKeyTCB, body)
}

func (e *TDX) issueQEIdentity(now time.Time) error {
	date := now.Format(time.RFC3339)
	id := pcsEnclaveIdentity{
		ID: "TD_QE", Version: 2, IssueDate: now, NextUpdate: now.Add(collateralValidity), TCBEvaluationDataNumber: 1,
		MiscSelect: "00000000", MiscSelectMask: "FFFFFFFF",
		Attributes: hex.EncodeToString(qeAttributes), AttributesMask: "FBFFFFFFFFFFFFFF0000000000000000",
		MRSigner: hex.EncodeToString(e.qeMRSigner()), ISVProdID: tdxQEProdID,
		TCBLevels: []pcsTCBLevel{
			{TCB: pcsTCB{ISVSVN: tdxQESVN}, TCBDate: date, TCBStatus: string(pcs.TcbComponentStatusUpToDate)},
			{TCB: pcsTCB{ISVSVN: 0}, TCBDate: date, TCBStatus: string(pcs.TcbComponentStatusOutOfDate)},
		},
	}
	body, err := e.signedDocument("enclaveIdentity", id)
	if err != nil {
		return fmt.Errorf("emulating TDX PCS: %w", err)
	}
	return e.publish(pcs.QeIdentityURL(), "Sgx-Enclave-Identity-Issuer-Chain", tdxKeyTCB, body)
}

func (e *TDX) crl(now time.Time, issuer string, revoked []x509.RevocationListEntry) ([]byte, error) {
	e.crlNumber++
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number: big.NewInt(e.crlNumber), ThisUpdate: now, NextUpdate: now.Add(collateralValidity),
		RevokedCertificateEntries: revoked,
	}, e.certs[issuer], e.keys[issuer])
	if err != nil {
		return nil, fmt.Errorf("emulating TDX PCS: issuing the CRL of %q: %w", e.certs[issuer].Subject.CommonName, err)
	}
	return der, nil
}

func (e *TDX) issuePCKCRL(now time.Time) error {
	der, err := e.crl(now, tdxKeyCA, e.revoked)
	if err != nil {
		return err
	}
	return e.publish(pcs.PckCrlURL("platform"), "Sgx-Pck-Crl-Issuer-Chain", tdxKeyCA, der)
}

func (e *TDX) issueRootCRL(now time.Time) error {
	der, err := e.crl(now, tdxKeyRoot, nil)
	if err != nil {
		return err
	}
	return e.publish(TDXRootCRLURL, "", "", der)
}

// Save writes the platform's keys (mode 0600) and certificates under dir/emulated-tdx/, and its
// roots with attest.SaveRoots.
func (e *TDX) Save(dir string) error {
	e.mu.Lock()
	pdir := filepath.Join(dir, attest.PlatformEmulatedTDX.String())
	err := func() error {
		if err := os.MkdirAll(pdir, 0o755); err != nil {
			return err
		}
		for name, k := range e.keys {
			der, err := x509.MarshalPKCS8PrivateKey(k)
			if err != nil {
				return err
			}
			if err := writeFile(filepath.Join(pdir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), keyFileMode); err != nil {
				return err
			}
		}
		for name, c := range e.certs {
			if err := writeFile(filepath.Join(pdir, name+".pem"), certPEM(c), 0o644); err != nil {
				return err
			}
		}
		return nil
	}()
	e.mu.Unlock()
	if err != nil {
		return fmt.Errorf("saving emulated TDX platform: %w", err)
	}
	if err := attest.SaveRoots(dir, e.Roots()); err != nil {
		return fmt.Errorf("saving emulated TDX platform: %w", err)
	}
	return nil
}

// writeFile writes b to name with exactly mode perm, also when name existed before.
func writeFile(name string, b []byte, perm os.FileMode) error {
	if err := os.WriteFile(name, b, perm); err != nil {
		return err
	}
	return os.Chmod(name, perm)
}

// loadTDX returns the emulated TDX platform saved under dir, reporting what opts say. Its keys
// and CAs are the saved ones; the PCK certificate is re-issued if the FMSPC changed, and the
// collateral is re-issued (keeping revocations and other FMSPCs' TCB info) and saved again, so
// that the roots under dir verify what the platform signs from now on.
func loadTDX(dir string, opts Options) (Platform, error) {
	o, err := tdxOptionsOf(opts)
	if err != nil {
		return nil, err
	}
	pdir := filepath.Join(dir, attest.PlatformEmulatedTDX.String())
	e := &TDX{opts: o, keys: map[string]*ecdsa.PrivateKey{}, certs: map[string]*x509.Certificate{}, collateral: map[string][]byte{}}
	for _, name := range []string{tdxKeyRoot, tdxKeyCA, tdxKeyTCB, tdxKeyPCK, tdxKeyAK} {
		if e.keys[name], err = readKey(filepath.Join(pdir, name+".key")); err != nil {
			return nil, fmt.Errorf("loading emulated TDX platform: %w", err)
		}
	}
	for _, name := range []string{tdxKeyRoot, tdxKeyCA, tdxKeyTCB, tdxKeyPCK} {
		if e.certs[name], err = readCert(filepath.Join(pdir, name+".pem")); err != nil {
			return nil, fmt.Errorf("loading emulated TDX platform: %w", err)
		}
	}
	roots, err := attest.LoadRoots(dir)
	if err != nil {
		return nil, fmt.Errorf("loading emulated TDX platform: %w", err)
	}
	for _, r := range roots {
		if r.Platform != attest.PlatformEmulatedTDX {
			continue
		}
		if !bytes.Equal(r.Certificates[rootCertName], certPEM(e.certs[tdxKeyRoot])) {
			return nil, fmt.Errorf("loading emulated TDX platform: %s does not hold the root of %s", attest.RootsFile, pdir)
		}
		for k, v := range r.Collateral {
			e.collateral[k] = v
		}
		if b, ok := r.Collateral[pcs.PckCrlURL("platform")]; ok {
			crl, err := x509.ParseRevocationList(b)
			if err != nil {
				return nil, fmt.Errorf("loading emulated TDX platform: reading its PCK CRL: %w", err)
			}
			e.revoked = crl.RevokedCertificateEntries
			if crl.Number != nil && crl.Number.IsInt64() {
				e.crlNumber = crl.Number.Int64()
			}
		}
	}

	now := time.Now().UTC().Truncate(time.Second)
	exts, err := pcs.PckCertificateExtensions(e.certs[tdxKeyPCK])
	if err != nil {
		return nil, fmt.Errorf("loading emulated TDX platform: reading its PCK certificate: %w", err)
	}
	if exts.FMSPC != hex.EncodeToString(o.fmspc) || exts.PPID != hex.EncodeToString(e.ppid()) || now.Add(collateralValidity).After(e.certs[tdxKeyPCK].NotAfter) {
		err = e.issuePCK(now)
	} else {
		err = e.buildQECert()
	}
	if err != nil {
		return nil, err
	}
	if err := e.issueCollateral(now); err != nil {
		return nil, err
	}
	if err := e.Save(dir); err != nil {
		return nil, err
	}
	return e, nil
}

func readKey(name string) (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%s: no PEM private key", name)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%s: not a P-256 key", name)
	}
	return ek, nil
}

func readCert(name string) (*x509.Certificate, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM certificate", name)
	}
	return x509.ParseCertificate(blk.Bytes)
}
