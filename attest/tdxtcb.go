package attest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"strings"
	"time"

	"github.com/google/go-tdx-guest/pcs"
)

// Lethe's TDX TCB step: reading, verifying and applying Intel's TCB info and QE identity to a
// quote whose signatures and PCK chain have been verified. Lethe does this step itself, for
// quotes v4 and v5 alike, because go-tdx-guest v0.3.1 compares the FMSPC and PCEID of TCB info
// with the PCK certificate's as case-sensitive hex strings, and Intel PCS writes them in upper
// case: every current quote would be refused. Here they are compared as bytes.
//
// The rules are those of Intel's TDX TCB info v3 and TD_QE identity v2:
//   - TCB info and QE identity are signed (ECDSA P-256 over the exact bytes of their "tcbInfo"
//     and "enclaveIdentity" members) by the "Intel SGX TCB Signing" certificate, which the
//     issuer chain served beside them must show issued directly by the pinned root;
//   - each is valid from issueDate to nextUpdate, as is each CRL until its nextUpdate;
//   - the platform's TCB level is the first of tcbLevels whose SGX components the PCK
//     certificate's CPUSVN components all reach, whose PCESVN the PCK certificate's reaches, and
//     whose TDX components TEE_TCB_SVN reaches (from the third component on when the TDX module's
//     major version, TEE_TCB_SVN[1], is above 0);
//   - a TDX module of major version above 0 is rated by the tdxModuleIdentities entry
//     TDX_<major, two hex digits>: its first level whose isvsvn TEE_TCB_SVN[0] reaches;
//   - the quoting enclave is rated by QE identity's first level whose isvsvn its ISVSVN reaches.
//
// Only UpToDate is accepted, for each of the three.

// tdxAcceptedStatus is the only TCB status Lethe accepts for the platform, the TDX module and
// the quoting enclave.
const tdxAcceptedStatus = string(pcs.TcbComponentStatusUpToDate)

// Names Intel gives its certificates and the issuer-chain headers of Intel PCS.
const (
	intelTCBSignerName          = "Intel SGX TCB Signing"
	intelPlatformCAName         = "Intel SGX PCK Platform CA"
	intelProcessorCAName        = "Intel SGX PCK Processor CA"
	tcbInfoIssuerChainHeader    = "Tcb-Info-Issuer-Chain"
	qeIdentityIssuerChainHeader = "Sgx-Enclave-Identity-Issuer-Chain"
	pckCRLIssuerChainHeader     = "Sgx-Pck-Crl-Issuer-Chain"
)

// tdxQuoteFacts is what the TCB step needs of a quote whose signatures and PCK chain verified,
// whatever its version.
type tdxQuoteFacts struct {
	teeTCBSVN      []byte // 16 bytes
	mrSignerSEAM   []byte
	seamAttributes []byte
	qe             tdxQEReport
	// chain is the PCK chain, leaf first.
	chain []*x509.Certificate
}

// tdxQEReport is what the TCB step reads of the quoting enclave's report.
type tdxQEReport struct {
	miscSelect uint32
	attributes []byte // 16 bytes
	mrSigner   []byte // 32 bytes
	isvProdID  uint16
	isvSVN     uint16
}

// tdxHex is a hex string of Intel PCS JSON, in either case.
type tdxHex []byte

func (h *tdxHex) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := hex.DecodeString(s)
	if err != nil {
		return fmt.Errorf("decoding hex: %w", err)
	}
	*h = v
	return nil
}

type tdxTCBComponent struct {
	SVN byte `json:"svn"`
}

type tdxTCBLevel struct {
	TCB struct {
		SGX    []tdxTCBComponent `json:"sgxtcbcomponents"`
		PCESVN uint16            `json:"pcesvn"`
		TDX    []tdxTCBComponent `json:"tdxtcbcomponents"`
		ISVSVN uint16            `json:"isvsvn"`
	} `json:"tcb"`
	TCBDate     string   `json:"tcbDate"`
	TCBStatus   string   `json:"tcbStatus"`
	AdvisoryIDs []string `json:"advisoryIDs"`
}

type tdxModuleIdentity struct {
	ID             string        `json:"id"`
	MRSigner       tdxHex        `json:"mrsigner"`
	Attributes     tdxHex        `json:"attributes"`
	AttributesMask tdxHex        `json:"attributesMask"`
	TCBLevels      []tdxTCBLevel `json:"tcbLevels"`
}

// tdxTCBInfo is Intel's TDX TCB info v3 (the "tcbInfo" member of PCS's response).
type tdxTCBInfo struct {
	ID         string    `json:"id"`
	Version    int       `json:"version"`
	IssueDate  time.Time `json:"issueDate"`
	NextUpdate time.Time `json:"nextUpdate"`
	FMSPC      tdxHex    `json:"fmspc"`
	PCEID      tdxHex    `json:"pceId"`
	TDXModule  struct {
		MRSigner       tdxHex `json:"mrsigner"`
		Attributes     tdxHex `json:"attributes"`
		AttributesMask tdxHex `json:"attributesMask"`
	} `json:"tdxModule"`
	TDXModuleIdentities []tdxModuleIdentity `json:"tdxModuleIdentities"`
	TCBLevels           []tdxTCBLevel       `json:"tcbLevels"`
}

// tdxQEIdentity is Intel's TD_QE identity v2 (the "enclaveIdentity" member of PCS's response).
type tdxQEIdentity struct {
	ID             string        `json:"id"`
	Version        int           `json:"version"`
	IssueDate      time.Time     `json:"issueDate"`
	NextUpdate     time.Time     `json:"nextUpdate"`
	MiscSelect     tdxHex        `json:"miscselect"`
	MiscSelectMask tdxHex        `json:"miscselectMask"`
	Attributes     tdxHex        `json:"attributes"`
	AttributesMask tdxHex        `json:"attributesMask"`
	MRSigner       tdxHex        `json:"mrsigner"`
	ISVProdID      uint16        `json:"isvprodid"`
	TCBLevels      []tdxTCBLevel `json:"tcbLevels"`
}

// tdxSignedDoc is one signed PCS document: the exact signed bytes, the signature and the issuer
// chain served with it.
type tdxSignedDoc struct {
	name      string // "TCB info", "QE identity"
	body      []byte // the exact bytes signed
	signature []byte // r‖s, 64 bytes
	signer    *x509.Certificate
	root      *x509.Certificate
}

// tdxCollateral is the collateral of one quote, read but not yet verified.
type tdxCollateral struct {
	tcbInfo    tdxTCBInfo
	tcbInfoDoc tdxSignedDoc
	qeIdentity tdxQEIdentity
	qeIDDoc    tdxSignedDoc
	// CRLs, read only when revocations are checked.
	pckCRL  *x509.RevocationList
	rootCRL *x509.RevocationList
}

// tdxPCKExtensions reads the PCK leaf's SGX extensions. It runs before the chain is verified
// (the FMSPC names the TCB info to read), so a hostile certificate must be an error, not a
// crash. Its errors are *RejectError.
func tdxPCKExtensions(pck *x509.Certificate) (_ *pcs.PckExtensions, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = reject(ReasonMalformed, "reading the PCK certificate's SGX extensions: %v", r)
		}
	}()
	exts, err := pcs.PckCertificateExtensions(pck)
	if err != nil {
		return nil, reject(ReasonMalformed, "reading the PCK certificate's SGX extensions: %w", err)
	}
	if len(exts.TCB.CPUSvnComponents) != 16 {
		return nil, reject(ReasonMalformed, "reading the PCK certificate's SGX extensions: %d CPUSVN components, want 16", len(exts.TCB.CPUSvnComponents))
	}
	return exts, nil
}

// tdxPCKCA names the CA that issued the PCK leaf as Intel PCS's pckcrl endpoint does.
func tdxPCKCA(pck *x509.Certificate) (string, error) {
	switch pck.Issuer.CommonName {
	case intelPlatformCAName:
		return "platform", nil
	case intelProcessorCAName:
		return "processor", nil
	}
	return "", fmt.Errorf("PCK certificate issuer %q is neither %q nor %q", pck.Issuer.CommonName, intelPlatformCAName, intelProcessorCAName)
}

// fetchTDXCollateral reads the quote's TCB info and QE identity, and its CRLs when revocations
// are checked, from cache. It verifies nothing. Its errors are *RejectError (ReasonCollateral for
// a missing or unreadable document) or ctx's error.
func fetchTDXCollateral(ctx context.Context, cache *collateralCache, root *x509.Certificate, exts *pcs.PckExtensions, pck *x509.Certificate, revocations bool) (*tdxCollateral, error) {
	get := func(what, u string) (map[string][]string, []byte, error) {
		h, b, err := cache.get(ctx, u)
		if err != nil {
			if ctxErr := ctx.Err(); ctxErr != nil {
				return nil, nil, ctxErr
			}
			return nil, nil, reject(ReasonCollateral, "reading %s: %w", what, err)
		}
		return h, b, nil
	}
	var c tdxCollateral
	// The URL names the FMSPC in lower case, as the offline cache and Intel PCS both take it.
	h, b, err := get("TCB info", pcs.TcbInfoURL(strings.ToLower(exts.FMSPC)))
	if err != nil {
		return nil, err
	}
	if c.tcbInfoDoc, err = tdxReadSignedDoc("TCB info", "tcbInfo", tcbInfoIssuerChainHeader, h, b, &c.tcbInfo); err != nil {
		return nil, err
	}
	if h, b, err = get("QE identity", pcs.QeIdentityURL()); err != nil {
		return nil, err
	}
	if c.qeIDDoc, err = tdxReadSignedDoc("QE identity", "enclaveIdentity", qeIdentityIssuerChainHeader, h, b, &c.qeIdentity); err != nil {
		return nil, err
	}
	if !revocations {
		return &c, nil
	}
	ca, err := tdxPCKCA(pck)
	if err != nil {
		return nil, reject(ReasonChain, "reading the PCK CRL: %w", err)
	}
	if _, b, err = get("the PCK CRL", pcs.PckCrlURL(ca)); err != nil {
		return nil, err
	}
	if c.pckCRL, err = x509.ParseRevocationList(b); err != nil {
		return nil, reject(ReasonCollateral, "parsing the PCK CRL: %w", err)
	}
	if len(root.CRLDistributionPoints) == 0 {
		return nil, reject(ReasonCollateral, "reading the root CA CRL: the root certificate names no CRL distribution point")
	}
	var errs []error
	for _, u := range root.CRLDistributionPoints {
		_, b, err := cache.get(ctx, u)
		if err == nil {
			if c.rootCRL, err = x509.ParseRevocationList(b); err == nil {
				return &c, nil
			}
		}
		errs = append(errs, err)
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return nil, ctxErr
	}
	return nil, reject(ReasonCollateral, "reading the root CA CRL: %w", errors.Join(errs...))
}

// tdxReadSignedDoc reads a PCS response {"<member>": {...}, "signature": "<hex>"} with its issuer
// chain in header: the member's exact bytes are what is signed, and are decoded into out.
func tdxReadSignedDoc(name, member, header string, headers map[string][]string, body []byte, out any) (tdxSignedDoc, error) {
	d := tdxSignedDoc{name: name}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(body, &doc); err != nil {
		return d, reject(ReasonCollateral, "parsing %s: %w", name, err)
	}
	d.body = doc[member]
	if len(d.body) == 0 {
		return d, reject(ReasonCollateral, "parsing %s: no %q member", name, member)
	}
	if err := json.Unmarshal(d.body, out); err != nil {
		return d, reject(ReasonCollateral, "parsing %s: %w", name, err)
	}
	var sig string
	if err := json.Unmarshal(doc["signature"], &sig); err != nil {
		return d, reject(ReasonCollateral, "parsing %s: no signature string: %w", name, err)
	}
	var err error
	if d.signature, err = hex.DecodeString(sig); err != nil || len(d.signature) != 64 {
		return d, reject(ReasonCollateral, "parsing %s: signature is not 64 bytes of hex", name)
	}
	var chain string
	for k, v := range headers {
		if strings.EqualFold(k, header) && len(v) == 1 {
			chain = v[0]
		}
	}
	if chain == "" {
		return d, reject(ReasonCollateral, "reading %s: no issuer chain (response header %s)", name, header)
	}
	if d.signer, d.root, err = tdxIssuerChain(chain); err != nil {
		return d, reject(ReasonCollateral, "reading %s issuer chain: %w", name, err)
	}
	return d, nil
}

// tdxIssuerChain decodes an issuer chain as Intel PCS serves it in a header: URL-encoded PEM
// of the signing certificate and the root.
func tdxIssuerChain(s string) (signer, root *x509.Certificate, err error) {
	p, err := url.QueryUnescape(s)
	if err != nil {
		return nil, nil, fmt.Errorf("URL-decoding: %w", err)
	}
	certs, rest, err := tdxPEMCertificates([]byte(p))
	if err != nil {
		return nil, nil, err
	}
	if len(certs) != 2 || len(bytes.TrimSpace(rest)) != 0 {
		return nil, nil, fmt.Errorf("%d PEM certificates, want 2 (signer, root)", len(certs))
	}
	return certs[0], certs[1], nil
}

// tdxPEMCertificates parses the PEM certificates at the start of b, in order, and returns
// them with what follows them.
func tdxPEMCertificates(b []byte) (certs []*x509.Certificate, rest []byte, err error) {
	rest = b
	for {
		block, next := pem.Decode(rest)
		if block == nil {
			return certs, rest, nil
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("parsing certificate %d: %w", len(certs), err)
		}
		certs, rest = append(certs, c), next
	}
}

// tdxCheckValidity rejects (ReasonExpired) a certificate outside its validity at now.
func tdxCheckValidity(what string, c *x509.Certificate, now time.Time) error {
	if now.Before(c.NotBefore) || now.After(c.NotAfter) {
		return reject(ReasonExpired, "%s is valid from %s until %s, not at %s", what,
			c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	return nil
}

// verify checks d's issuer chain (signer issued by root, root the pinned one, both valid at
// now) and d's signature.
func (d *tdxSignedDoc) verify(root *x509.Certificate, now time.Time) error {
	if !d.root.Equal(root) {
		return reject(ReasonChain, "%s issuer chain ends at %q (serial %x), not the pinned root", d.name, d.root.Subject, d.root.SerialNumber)
	}
	if d.signer.Subject.CommonName != intelTCBSignerName {
		return reject(ReasonChain, "%s is signed by %q, not %q", d.name, d.signer.Subject.CommonName, intelTCBSignerName)
	}
	if err := d.signer.CheckSignatureFrom(root); err != nil {
		return reject(ReasonChain, "%s signing certificate is not issued by the pinned root: %w", d.name, err)
	}
	if err := tdxCheckValidity(d.name+" signing certificate", d.signer, now); err != nil {
		return err
	}
	if err := tdxCheckValidity(d.name+" root certificate", d.root, now); err != nil {
		return err
	}
	pub, ok := d.signer.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return reject(ReasonChain, "%s signing certificate holds no ECDSA key", d.name)
	}
	digest := sha256.Sum256(d.body)
	r, s := new(big.Int).SetBytes(d.signature[:32]), new(big.Int).SetBytes(d.signature[32:])
	if !ecdsa.Verify(pub, digest[:], r, s) {
		return reject(ReasonSignature, "%s signature does not verify with its signing certificate", d.name)
	}
	return nil
}

// verifyTDXCollateral checks the signatures and validity of c at now and, when c holds CRLs,
// the revocation of the PCK chain and of the signing certificates. Its errors are *RejectError.
func verifyTDXCollateral(c *tdxCollateral, root *x509.Certificate, chain []*x509.Certificate, now time.Time) error {
	if c.tcbInfo.ID != "TDX" || c.tcbInfo.Version != 3 {
		return reject(ReasonCollateral, "TCB info is %q version %d, want TDX TCB info version 3", c.tcbInfo.ID, c.tcbInfo.Version)
	}
	if c.qeIdentity.ID != "TD_QE" || c.qeIdentity.Version != 2 {
		return reject(ReasonCollateral, "QE identity is %q version %d, want TD_QE identity version 2", c.qeIdentity.ID, c.qeIdentity.Version)
	}
	for _, d := range []*tdxSignedDoc{&c.tcbInfoDoc, &c.qeIDDoc} {
		if err := d.verify(root, now); err != nil {
			return err
		}
	}
	stamp := func(t time.Time) string { return t.UTC().Format(time.RFC3339) }
	// The messages keep the words go-tdx-guest used ("tcbInfo has expired"), which operators
	// and tests already match on.
	switch {
	case now.After(c.tcbInfo.NextUpdate):
		return reject(ReasonExpired, "tcbInfo has expired: its nextUpdate is %s, before %s", stamp(c.tcbInfo.NextUpdate), stamp(now))
	case now.Before(c.tcbInfo.IssueDate):
		return reject(ReasonExpired, "tcbInfo is not yet valid: issued %s, after %s", stamp(c.tcbInfo.IssueDate), stamp(now))
	case now.After(c.qeIdentity.NextUpdate):
		return reject(ReasonExpired, "QeIdentity has expired: its nextUpdate is %s, before %s", stamp(c.qeIdentity.NextUpdate), stamp(now))
	case now.Before(c.qeIdentity.IssueDate):
		return reject(ReasonExpired, "QeIdentity is not yet valid: issued %s, after %s", stamp(c.qeIdentity.IssueDate), stamp(now))
	}
	if c.pckCRL == nil {
		return nil
	}

	pck, intermediate := chain[0], chain[1]
	if err := c.rootCRL.CheckSignatureFrom(root); err != nil {
		return reject(ReasonChain, "root CA CRL is not signed by the pinned root: %w", err)
	}
	if err := c.pckCRL.CheckSignatureFrom(intermediate); err != nil {
		return reject(ReasonChain, "PCK CRL is not signed by the PCK chain's intermediate CA: %w", err)
	}
	if !bytes.Equal(c.pckCRL.RawIssuer, pck.RawIssuer) {
		return reject(ReasonChain, "PCK CRL is issued by %q, the PCK certificate by %q", c.pckCRL.Issuer, pck.Issuer)
	}
	switch {
	case now.After(c.rootCRL.NextUpdate):
		return reject(ReasonExpired, "root CA CRL has expired: its nextUpdate is %s, before %s", stamp(c.rootCRL.NextUpdate), stamp(now))
	case now.After(c.pckCRL.NextUpdate):
		return reject(ReasonExpired, "PCK CRL has expired: its nextUpdate is %s, before %s", stamp(c.pckCRL.NextUpdate), stamp(now))
	}
	revoked := func(crl *x509.RevocationList, what string, cert *x509.Certificate) error {
		for _, e := range crl.RevokedCertificateEntries {
			if e.SerialNumber.Cmp(cert.SerialNumber) == 0 {
				return reject(ReasonRevoked, "%s (serial %x) was revoked at %s", what, cert.SerialNumber, stamp(e.RevocationTime))
			}
		}
		return nil
	}
	for _, err := range []error{
		revoked(c.pckCRL, "PCK certificate", pck),
		revoked(c.rootCRL, "PCK intermediate CA certificate", intermediate),
		revoked(c.rootCRL, "TCB info signing certificate", c.tcbInfoDoc.signer),
		revoked(c.rootCRL, "QE identity signing certificate", c.qeIDDoc.signer),
	} {
		if err != nil {
			return err
		}
	}
	return nil
}

// tdxTCBStatus applies verified collateral c to the quote: it checks that c describes this
// platform (FMSPC and PCEID, compared as bytes), the TDX module (MRSIGNERSEAM, SEAM attributes)
// and the quoting enclave (MRSIGNER, ISVPRODID, MISCSELECT, attributes), finds the TCB levels of
// the platform, the TDX module and the QE, and returns the status, which is accepted only when
// all three are UpToDate. Its errors are *RejectError: ReasonTCB when no level matches or a
// status is not accepted.
func tdxTCBStatus(c *tdxCollateral, q *tdxQuoteFacts, exts *pcs.PckExtensions) (string, error) {
	info := &c.tcbInfo
	fmspc, err := hex.DecodeString(exts.FMSPC)
	if err != nil {
		return "", reject(ReasonMalformed, "reading the PCK certificate's FMSPC: %w", err)
	}
	if !bytes.Equal(fmspc, info.FMSPC) {
		return "", reject(ReasonCollateral, "TCB info is for FMSPC %x, the PCK certificate's is %x", []byte(info.FMSPC), fmspc)
	}
	pceid, err := hex.DecodeString(exts.PCEID)
	if err != nil {
		return "", reject(ReasonMalformed, "reading the PCK certificate's PCEID: %w", err)
	}
	if !bytes.Equal(pceid, info.PCEID) {
		return "", reject(ReasonCollateral, "TCB info is for PCEID %x, the PCK certificate's is %x", []byte(info.PCEID), pceid)
	}
	if err := tdxCheckModule("TCB info's TDX module", info.TDXModule.MRSigner, info.TDXModule.Attributes, info.TDXModule.AttributesMask, q); err != nil {
		return "", err
	}

	svn := q.teeTCBSVN
	platform, ok := tdxPlatformLevel(info.TCBLevels, exts.TCB.CPUSvnComponents, exts.TCB.PCESvn, svn)
	if !ok {
		return "", reject(ReasonTCB, "no matching TCB level found in TCB info (FMSPC %x, issued %s): CPUSVN components %x, PCESVN %d, TEE_TCB_SVN %x",
			fmspc, info.IssueDate.UTC().Format(time.DateOnly), exts.TCB.CPUSvnComponents, exts.TCB.PCESvn, svn)
	}
	if err := tdxAccept("platform TCB level", platform); err != nil {
		return "", err
	}

	if svn[1] > 0 {
		id := fmt.Sprintf("TDX_%02X", svn[1])
		var module *tdxModuleIdentity
		for i := range info.TDXModuleIdentities {
			if strings.EqualFold(info.TDXModuleIdentities[i].ID, id) {
				module = &info.TDXModuleIdentities[i]
				break
			}
		}
		if module == nil {
			return "", reject(ReasonTCB, "TCB info rates no TDX module %s (TEE_TCB_SVN %x)", id, svn)
		}
		if err := tdxCheckModule("TCB info's "+id, module.MRSigner, module.Attributes, module.AttributesMask, q); err != nil {
			return "", err
		}
		level, ok := tdxISVLevel(module.TCBLevels, uint16(svn[0]))
		if !ok {
			return "", reject(ReasonTCB, "no TCB level of TDX module %s matches its SVN %d", id, svn[0])
		}
		if err := tdxAccept("TDX module "+id+" TCB level", level); err != nil {
			return "", err
		}
	}

	qe, qid := q.qe, &c.qeIdentity
	switch {
	case len(qid.MiscSelect) != 4 || len(qid.MiscSelectMask) != 4:
		return "", reject(ReasonCollateral, "QE identity's MISCSELECT and its mask are not 4 bytes each")
	case len(qid.Attributes) != len(qe.attributes) || len(qid.AttributesMask) != len(qe.attributes):
		return "", reject(ReasonCollateral, "QE identity's attributes and their mask are not %d bytes each", len(qe.attributes))
	}
	misc := uint32(qid.MiscSelect[0]) | uint32(qid.MiscSelect[1])<<8 | uint32(qid.MiscSelect[2])<<16 | uint32(qid.MiscSelect[3])<<24
	miscMask := uint32(qid.MiscSelectMask[0]) | uint32(qid.MiscSelectMask[1])<<8 | uint32(qid.MiscSelectMask[2])<<16 | uint32(qid.MiscSelectMask[3])<<24
	switch {
	case qe.miscSelect&miscMask != misc:
		return "", reject(ReasonChain, "quoting enclave's MISCSELECT %08x (masked %08x) is not QE identity's %08x", qe.miscSelect, qe.miscSelect&miscMask, misc)
	case !bytes.Equal(tdxMask(qe.attributes, qid.AttributesMask), qid.Attributes):
		return "", reject(ReasonChain, "quoting enclave's attributes %x are not QE identity's %x under mask %x", qe.attributes, []byte(qid.Attributes), []byte(qid.AttributesMask))
	case !bytes.Equal(qe.mrSigner, qid.MRSigner):
		return "", reject(ReasonChain, "quoting enclave's MRSIGNER %x is not QE identity's %x", qe.mrSigner, []byte(qid.MRSigner))
	case qe.isvProdID != qid.ISVProdID:
		return "", reject(ReasonChain, "quoting enclave's ISVPRODID %d is not QE identity's %d", qe.isvProdID, qid.ISVProdID)
	}
	level, ok := tdxISVLevel(qid.TCBLevels, qe.isvSVN)
	if !ok {
		return "", reject(ReasonTCB, "no TCB level of QE identity matches the quoting enclave's ISVSVN %d", qe.isvSVN)
	}
	if err := tdxAccept("quoting enclave TCB level", level); err != nil {
		return "", err
	}
	return tdxAcceptedStatus, nil
}

// tdxCheckModule checks the quote's TDX module against a TDX module description of TCB info.
func tdxCheckModule(what string, mrSigner, attributes, mask []byte, q *tdxQuoteFacts) error {
	if !bytes.Equal(mrSigner, q.mrSignerSEAM) {
		return reject(ReasonChain, "quote's MRSIGNERSEAM %x is not %s MRSIGNER %x", q.mrSignerSEAM, what, mrSigner)
	}
	if len(mask) != len(q.seamAttributes) || len(attributes) != len(q.seamAttributes) {
		return reject(ReasonCollateral, "%s attributes and their mask are not %d bytes each", what, len(q.seamAttributes))
	}
	if got := tdxMask(q.seamAttributes, mask); !bytes.Equal(got, attributes) {
		return reject(ReasonChain, "quote's SEAM attributes %x (masked %x) are not %s attributes %x", q.seamAttributes, got, what, attributes)
	}
	return nil
}

func tdxMask(b, mask []byte) []byte {
	out := make([]byte, len(b))
	for i := range b {
		out[i] = b[i] & mask[i]
	}
	return out
}

// tdxPlatformLevel returns the first of levels that the platform's TCB reaches.
func tdxPlatformLevel(levels []tdxTCBLevel, cpuSVN []byte, pceSVN uint16, teeTCBSVN []byte) (tdxTCBLevel, bool) {
	// With a TDX module of major version above 0, its first two components are rated by the
	// module's own identity instead.
	first := 0
	if teeTCBSVN[1] > 0 {
		first = 2
	}
	for _, l := range levels {
		if len(l.TCB.SGX) != len(cpuSVN) || len(l.TCB.TDX) != len(teeTCBSVN) || pceSVN < l.TCB.PCESVN {
			continue
		}
		reached := true
		for i, c := range l.TCB.SGX {
			reached = reached && cpuSVN[i] >= c.SVN
		}
		for i := first; i < len(teeTCBSVN); i++ {
			reached = reached && teeTCBSVN[i] >= l.TCB.TDX[i].SVN
		}
		if reached {
			return l, true
		}
	}
	return tdxTCBLevel{}, false
}

// tdxISVLevel returns the first of levels whose isvsvn svn reaches.
func tdxISVLevel(levels []tdxTCBLevel, svn uint16) (tdxTCBLevel, bool) {
	for _, l := range levels {
		if svn >= l.TCB.ISVSVN {
			return l, true
		}
	}
	return tdxTCBLevel{}, false
}

// tdxAccept rejects (ReasonTCB) a level whose status Lethe does not accept.
func tdxAccept(what string, l tdxTCBLevel) error {
	if l.TCBStatus == tdxAcceptedStatus {
		return nil
	}
	msg := fmt.Sprintf("%s (%s) status is not %q, found %q", what, l.TCBDate, tdxAcceptedStatus, l.TCBStatus)
	if len(l.AdvisoryIDs) > 0 {
		msg += " (advisories " + strings.Join(l.AdvisoryIDs, ", ") + ")"
	}
	return &RejectError{Reason: ReasonTCB, Err: errors.New(msg)}
}
