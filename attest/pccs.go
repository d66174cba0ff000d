package attest

import (
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/google/go-tdx-guest/pcs"
)

// maxPCCSCollateralSize bounds a QuoteCollateralV3 document: Intel's largest PCK CRL makes it
// a few tens of KiB.
const maxPCCSCollateralSize = 4 << 20

// pccsCollateral is Intel collateral in the QuoteCollateralV3 JSON form that PCCS clients and
// DCAP quote verifiers exchange: each signed document as the exact JSON string Intel signed,
// its signature in hex, issuer chains as PEM, CRLs as hex DER.
type pccsCollateral struct {
	TCBInfoIssuerChain    string `json:"tcb_info_issuer_chain"`
	TCBInfo               string `json:"tcb_info"`
	TCBInfoSignature      string `json:"tcb_info_signature"`
	QEIdentityIssuerChain string `json:"qe_identity_issuer_chain"`
	QEIdentity            string `json:"qe_identity"`
	QEIdentitySignature   string `json:"qe_identity_signature"`
	PCKCRLIssuerChain     string `json:"pck_crl_issuer_chain"`
	PCKCRL                string `json:"pck_crl"`
	RootCACRL             string `json:"root_ca_crl"`
}

// PCCSCollateral converts Intel TDX collateral in the QuoteCollateralV3 JSON form (members
// tcb_info, tcb_info_signature, tcb_info_issuer_chain, qe_identity, qe_identity_signature,
// qe_identity_issuer_chain, pck_crl, pck_crl_issuer_chain, root_ca_crl) into the documents Intel
// PCS serves, keyed by the URL it serves them at, with their issuer-chain headers under the URL
// plus CollateralHeadersSuffix: the form of Config.TDXCollateral and of a collateral directory.
// TCB info and QE identity are required; the CRLs are converted when present.
//
// It verifies nothing: the signatures, issuer chains and validity are checked when a quote is
// verified with the documents. It returns an error for JSON that is not of this form.
func PCCSCollateral(b []byte) (map[string][]byte, error) {
	if len(b) > maxPCCSCollateralSize {
		return nil, fmt.Errorf("reading PCCS collateral: %d bytes exceeds the %d-byte limit", len(b), maxPCCSCollateralSize)
	}
	var c pccsCollateral
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("reading PCCS collateral: %w", err)
	}
	if c.TCBInfo == "" || c.QEIdentity == "" {
		return nil, errors.New("reading PCCS collateral: no tcb_info or qe_identity: not QuoteCollateralV3 JSON")
	}
	docs := map[string][]byte{}
	signed := func(member, body, signature string) ([]byte, error) {
		if !json.Valid([]byte(body)) {
			return nil, fmt.Errorf("reading PCCS collateral: %s is not JSON", member)
		}
		if _, err := hex.DecodeString(signature); err != nil {
			return nil, fmt.Errorf("reading PCCS collateral: %s signature: %w", member, err)
		}
		sig, _ := json.Marshal(signature)
		// The signed bytes are kept exactly as given: the signature is over them.
		return fmt.Appendf(nil, `{%q:%s,"signature":%s}`, member, body, sig), nil
	}
	var info struct {
		FMSPC string `json:"fmspc"`
	}
	if err := json.Unmarshal([]byte(c.TCBInfo), &info); err != nil {
		return nil, fmt.Errorf("reading PCCS collateral: tcb_info: %w", err)
	}
	if _, err := hex.DecodeString(info.FMSPC); err != nil || info.FMSPC == "" {
		return nil, fmt.Errorf("reading PCCS collateral: tcb_info FMSPC %q is not hex", info.FMSPC)
	}
	tcbInfo, err := signed("tcbInfo", c.TCBInfo, c.TCBInfoSignature)
	if err != nil {
		return nil, err
	}
	qeIdentity, err := signed("enclaveIdentity", c.QEIdentity, c.QEIdentitySignature)
	if err != nil {
		return nil, err
	}
	put := func(u string, body []byte, header, chain string) error {
		docs[u] = body
		if header == "" {
			return nil
		}
		if chain == "" {
			return fmt.Errorf("reading PCCS collateral: no issuer chain for %s", u)
		}
		hb, err := json.Marshal(collateralDoc{Headers: map[string][]string{header: {url.QueryEscape(chain)}}})
		if err != nil {
			return fmt.Errorf("reading PCCS collateral: %w", err)
		}
		docs[u+CollateralHeadersSuffix] = hb
		return nil
	}
	// Lethe asks for TCB info by the PCK certificate's FMSPC, in lower case.
	if err := put(pcs.TcbInfoURL(strings.ToLower(info.FMSPC)), tcbInfo, tcbInfoIssuerChainHeader, c.TCBInfoIssuerChain); err != nil {
		return nil, err
	}
	if err := put(pcs.QeIdentityURL(), qeIdentity, qeIdentityIssuerChainHeader, c.QEIdentityIssuerChain); err != nil {
		return nil, err
	}
	if c.PCKCRL != "" {
		der, crl, err := pccsCRL("pck_crl", c.PCKCRL)
		if err != nil {
			return nil, err
		}
		var ca string
		switch crl.Issuer.CommonName {
		case intelPlatformCAName:
			ca = "platform"
		case intelProcessorCAName:
			ca = "processor"
		default:
			return nil, fmt.Errorf("reading PCCS collateral: pck_crl is issued by %q, not an Intel PCK CA", crl.Issuer.CommonName)
		}
		if err := put(pcs.PckCrlURL(ca), der, pckCRLIssuerChainHeader, c.PCKCRLIssuerChain); err != nil {
			return nil, err
		}
	}
	if c.RootCACRL != "" {
		der, _, err := pccsCRL("root_ca_crl", c.RootCACRL)
		if err != nil {
			return nil, err
		}
		// The root CA CRL is published where the root certificate says; the root is the last
		// certificate of an issuer chain.
		_, root, err := tdxIssuerChain(url.QueryEscape(c.QEIdentityIssuerChain))
		if err != nil {
			return nil, fmt.Errorf("reading PCCS collateral: qe_identity_issuer_chain: %w", err)
		}
		if len(root.CRLDistributionPoints) == 0 {
			return nil, errors.New("reading PCCS collateral: the issuer chain's root names no CRL distribution point for root_ca_crl")
		}
		for _, u := range root.CRLDistributionPoints {
			if err := put(u, der, "", ""); err != nil {
				return nil, err
			}
		}
	}
	return docs, nil
}

// pccsCRL decodes a CRL given as hex DER (or PEM).
func pccsCRL(member, s string) ([]byte, *x509.RevocationList, error) {
	der, err := hex.DecodeString(strings.TrimSpace(s))
	if err != nil {
		b, _ := pem.Decode([]byte(s))
		if b == nil {
			return nil, nil, fmt.Errorf("reading PCCS collateral: %s is neither hex nor PEM", member)
		}
		der = b.Bytes
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		return nil, nil, fmt.Errorf("reading PCCS collateral: %s: %w", member, err)
	}
	return der, crl, nil
}

// collateralCacheWith returns a cache of dir (fetching when fetch is set) that serves docs
// first: documents keyed by URL, with their response headers as JSON under the URL plus
// CollateralHeadersSuffix. what names the documents in errors.
func collateralCacheWith(dir string, fetch bool, docs map[string][]byte, what string) (*collateralCache, error) {
	c := newCollateralCache(dir, fetch)
	for key, body := range docs {
		if strings.HasSuffix(key, CollateralHeadersSuffix) {
			continue
		}
		var d collateralDoc
		if hb, ok := docs[key+CollateralHeadersSuffix]; ok {
			if err := json.Unmarshal(hb, &d); err != nil {
				return nil, fmt.Errorf("reading %s collateral headers of %s: %w", what, key, err)
			}
		}
		c.addStatic(key, d.Headers, body)
	}
	return c, nil
}
