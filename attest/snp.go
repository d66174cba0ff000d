package attest

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/go-sev-guest/validate"
	"github.com/google/go-sev-guest/verify"
	"github.com/google/go-sev-guest/verify/trust"
	"github.com/google/uuid"
)

// snpProductLines are the SEV-SNP product lines whose AMD roots go-sev-guest carries.
var snpProductLines = []string{"Milan", "Genoa", "Turin"}

// snpVerifier verifies SEV-SNP reports through go-sev-guest's verify package, with fresh
// verify.Options per call (the library writes into them). It is safe for concurrent use: after
// newSNPVerifier it only reads its fields, but for its caches, which lock.
type snpVerifier struct {
	now   func() time.Time
	cache *collateralCache
	// vlekCache reads VLEK certificates from the same directory as cache, never fetching:
	// AMD KDS serves them to cloud providers only (see snpVLEKURL).
	vlekCache        *collateralCache
	checkRevocations bool
	productLine      string

	// amd are AMD's roots built into go-sev-guest, by product line: for PlatformSEVSNP only.
	amd map[string][]*trust.ProductCerts
	// emulated are the roots configured for PlatformEmulatedSEVSNP, by product line. Empty: no
	// emulated evidence is accepted.
	emulated map[string][]*trust.ProductCerts
	// emulatorCRLs serves the CRLs of each emulated root (see emulatorCache); the CRLs of
	// AMD's roots come from cache.
	emulatorCRLs map[*trust.ProductCerts]*collateralCache

	// chains remembers endorsement key certificates that chained to a root (see
	// snpChainEntry); crls remembers CRLs whose ARK signature verified, parsed. Both are
	// this verifier's own (see verifiedCache for why a hit is as good as the work).
	chains *verifiedCache[*snpChainEntry]
	crls   *verifiedCache[*x509.RevocationList]
}

func newSNPVerifier(cfg Config, cache *collateralCache) (*snpVerifier, error) {
	v := &snpVerifier{
		now:              cfg.Now,
		cache:            cache,
		vlekCache:        newCollateralCache(cfg.CollateralDir, false),
		checkRevocations: cfg.CheckRevocations,
		productLine:      cfg.ProductLine,
		amd:              map[string][]*trust.ProductCerts{},
		emulated:         map[string][]*trust.ProductCerts{},
		emulatorCRLs:     map[*trust.ProductCerts]*collateralCache{},
		chains:           newVerifiedCache[*snpChainEntry](chainCacheSize),
		crls:             newVerifiedCache[*x509.RevocationList](crlCacheSize),
	}
	if v.now == nil {
		v.now = time.Now
	}
	if v.productLine != "" {
		if _, err := kds.ParseProductLine(v.productLine); err != nil {
			return nil, fmt.Errorf("checking product line: %w", err)
		}
	}
	vlekChains := map[string][]byte{
		"Milan": trust.AskArkMilanVlekBytes,
		"Genoa": trust.AskArkGenoaVlekBytes,
		"Turin": trust.AskArkTurinVlekBytes,
	}
	for _, line := range snpProductLines {
		root, err := trust.GetDefaultRootCerts(line)
		if err != nil {
			return nil, fmt.Errorf("loading AMD roots: %w", err)
		}
		pc := &trust.ProductCerts{Ask: root.ProductCerts.Ask, Ark: root.ProductCerts.Ark}
		// The published chain files may end in stray whitespace, which the parser refuses.
		vlek, err := parseSNPProductCerts(bytes.TrimSpace(vlekChains[line]))
		if err != nil {
			return nil, fmt.Errorf("loading AMD VLEK roots of %s: %w", line, err)
		}
		pc.Asvk = vlek.Asvk
		v.amd[line] = []*trust.ProductCerts{pc}
	}
	for _, r := range cfg.Roots {
		switch r.Platform {
		case PlatformSEVSNP:
			return nil, errors.New("roots for sev-snp cannot be configured: real SEV-SNP evidence verifies against AMD's roots only")
		case PlatformEmulatedSEVSNP:
		default:
			continue
		}
		ecache, err := emulatorCache(r)
		if err != nil {
			return nil, err
		}
		for line, chain := range r.Certificates {
			if _, err := kds.ParseProductLine(line); err != nil {
				return nil, fmt.Errorf("loading %v roots: %w", r.Platform, err)
			}
			pc, err := parseSNPProductCerts(chain)
			if err != nil {
				return nil, fmt.Errorf("loading %v roots of %s: %w", r.Platform, line, err)
			}
			v.emulated[line] = append(v.emulated[line], pc)
			v.emulatorCRLs[pc] = ecache
		}
	}
	return v, nil
}

// parseSNPProductCerts reads an ASK (or ASVK) and ARK in the KDS cert_chain format.
func parseSNPProductCerts(chain []byte) (*trust.ProductCerts, error) {
	ask, ark, err := kds.ParseProductCertChain(chain)
	if err != nil {
		return nil, err
	}
	pc := &trust.ProductCerts{}
	ica, err := x509.ParseCertificate(ask)
	if err != nil {
		return nil, fmt.Errorf("parsing intermediate certificate: %w", err)
	}
	if pc.Ark, err = x509.ParseCertificate(ark); err != nil {
		return nil, fmt.Errorf("parsing ARK certificate: %w", err)
	}
	if len(ica.Subject.CommonName) > 8 && ica.Subject.CommonName[:8] == "SEV-VLEK" {
		pc.Asvk = ica
	} else {
		pc.Ask = ica
	}
	return pc, nil
}

// snpEvidence is raw SEV-SNP evidence taken apart: the report and its certificate table.
type snpEvidence struct {
	raw    []byte // the 1184-byte report
	report *spb.Report
	certs  *abi.CertTable
}

// parseSNPEvidence splits raw into the report and the certificate table that may follow it, as
// configfs-tsm returns them. It checks shape only.
func parseSNPEvidence(raw []byte) (*snpEvidence, error) {
	if len(raw) < abi.ReportSize {
		return nil, fmt.Errorf("SEV-SNP evidence is %d bytes, shorter than a %d-byte report", len(raw), abi.ReportSize)
	}
	rep := raw[:abi.ReportSize]
	if err := abi.ValidateReportFormat(rep); err != nil {
		return nil, fmt.Errorf("parsing SEV-SNP report: %w", err)
	}
	report, err := abi.ReportToProto(rep)
	if err != nil {
		return nil, fmt.Errorf("parsing SEV-SNP report: %w", err)
	}
	certs, err := parseSNPCertTable(raw[abi.ReportSize:])
	if err != nil {
		return nil, err
	}
	return &snpEvidence{raw: rep, report: report, certs: certs}, nil
}

// parseSNPCertTable parses a certificate table. It bounds every entry before handing the table to
// go-sev-guest's parser, whose offset arithmetic can wrap around.
func parseSNPCertTable(b []byte) (*abi.CertTable, error) {
	table := &abi.CertTable{}
	if len(b) == 0 {
		return table, nil
	}
	headers, err := abi.ParseSnpCertTableHeader(b)
	if err != nil {
		return nil, fmt.Errorf("parsing SEV-SNP certificate table: %w", err)
	}
	for i, h := range headers {
		if uint64(h.Offset)+uint64(h.Length) > uint64(len(b)) {
			return nil, fmt.Errorf("parsing SEV-SNP certificate table: entry %d (offset %d, length %d) is outside the %d-byte table", i, h.Offset, h.Length, len(b))
		}
	}
	if err := table.Unmarshal(b); err != nil {
		return nil, fmt.Errorf("parsing SEV-SNP certificate table: %w", err)
	}
	return table, nil
}

// certByGUID returns the table's entry with the given GUID, or nil.
func certByGUID(t *abi.CertTable, guid string) []byte {
	g := uuid.MustParse(guid)
	for _, e := range t.Entries {
		if e.GUID == g && len(e.RawCert) > 0 {
			return e.RawCert
		}
	}
	return nil
}

// snpSignerName returns "vcek" or "vlek".
func snpSignerName(k abi.ReportSigner) string {
	if k == abi.VlekReportSigner {
		return "vlek"
	}
	return "vcek"
}

func (v *snpVerifier) verify(ctx context.Context, p Platform, raw []byte) (*Claims, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var roots map[string][]*trust.ProductCerts
	switch p {
	case PlatformSEVSNP:
		roots = v.amd
	case PlatformEmulatedSEVSNP:
		if len(v.emulated) == 0 {
			return nil, reject(ReasonPlatform, "no roots configured for %v: emulated evidence is not accepted", p)
		}
		roots = v.emulated
	default:
		return nil, reject(ReasonPlatform, "%v is not an SEV-SNP platform", p)
	}
	ev, err := parseSNPEvidence(raw)
	if err != nil {
		return nil, &RejectError{Reason: ReasonMalformed, Err: err}
	}
	report := ev.report
	info, err := abi.ParseSignerInfo(report.GetSignerInfo())
	if err != nil {
		return nil, reject(ReasonMalformed, "parsing signer info: %w", err)
	}
	if info.SigningKey != abi.VcekReportSigner && info.SigningKey != abi.VlekReportSigner {
		return nil, reject(ReasonSignature, "report is signed by %v, not a VCEK or VLEK", info.SigningKey)
	}

	// The product line: in the report from version 3 on; for version 2, from the certificate
	// table's platform info, the configured product line, or the endorsement key certificate.
	line := ""
	if fms := report.GetCpuid1EaxFms(); fms != 0 {
		line = kds.ProductLineFromFms(fms)
		if _, err := kds.ParseProductLine(line); err != nil {
			return nil, reject(ReasonMalformed, "report names an unknown product (CPUID 0x%08x)", fms)
		}
	} else if v.productLine != "" {
		line = v.productLine
	} else if blob := certByGUID(ev.certs, abi.ExtraPlatformInfoGUID); blob != nil {
		if epi, err := abi.ParseExtraPlatformInfo(blob); err == nil {
			if l := kds.ProductLine(abi.SevProductFromCpuid1Eax(epi.Cpuid1Eax)); l != "Unknown" {
				line = l
			}
		}
	}

	ekDER, line, err := v.endorsementKey(ctx, ev, info.SigningKey, line, roots)
	if err != nil {
		return nil, err
	}
	ek, err := x509.ParseCertificate(ekDER)
	if err != nil {
		return nil, reject(ReasonChain, "parsing %v certificate: %w", info.SigningKey, err)
	}
	exts, err := parseSNPCertExtensions(ek, info.SigningKey)
	if err != nil {
		return nil, reject(ReasonChain, "reading %v certificate extensions: %w", info.SigningKey, err)
	}
	if line == "" {
		product, err := kds.ParseProductName(exts.ProductName, info.SigningKey)
		if err != nil {
			return nil, reject(ReasonChain, "reading the product of the %v certificate: %w", info.SigningKey, err)
		}
		line = kds.ProductLine(product)
	}
	candidates := roots[line]
	if len(candidates) == 0 {
		return nil, reject(ReasonChain, "no trusted %v roots for product line %q", p, line)
	}

	now := v.now()
	if now.Before(ek.NotBefore) || now.After(ek.NotAfter) {
		return nil, reject(ReasonExpired, "%v certificate is valid from %s until %s, not at %s", info.SigningKey,
			ek.NotBefore.UTC().Format(time.RFC3339), ek.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}

	opts := &verify.Options{
		Now:                 now,
		DisableCertFetching: true,
		TrustedRoots:        map[string][]*trust.AMDRootCerts{},
	}
	for _, pc := range candidates {
		opts.TrustedRoots[line] = append(opts.TrustedRoots[line], &trust.AMDRootCerts{ProductLine: line, ProductCerts: pc})
	}
	if report.GetCpuid1EaxFms() == 0 && v.productLine != "" {
		if opts.Product, err = kds.ParseProductLine(v.productLine); err != nil {
			return nil, reject(ReasonMalformed, "%w", err)
		}
	}
	chain := &spb.CertificateChain{Extras: map[string][]byte{}}
	if info.SigningKey == abi.VlekReportSigner {
		chain.VlekCert = ekDER
	} else {
		chain.VcekCert = ekDER
	}
	att := &spb.Attestation{Report: report, CertificateChain: chain}
	expectProduct := ""
	if opts.Product != nil {
		expectProduct = v.productLine
	}
	key := snpChainKey(p, info.SigningKey, report, line, expectProduct, ekDER, candidates)
	root := v.cachedChainRoot(key, report, ek, candidates, now)
	if root == nil {
		// The full path: what a cold cache or a failed shortcut always takes.
		if line == snpTurin {
			if err := verifyTurin(ev.raw, ek, info.SigningKey, candidates, now); err != nil {
				return nil, err
			}
		} else if err := verify.SnpAttestationContext(ctx, att, opts); err != nil {
			return nil, diagnoseSNP(ev.raw, ek, info.SigningKey, candidates, now, err)
		}
		var i int
		var chains [][]*x509.Certificate
		if root, i, chains = chainRoot(ek, info.SigningKey, candidates, now); root == nil {
			return nil, reject(ReasonChain, "%v certificate does not chain to a trusted %v root", info.SigningKey, p)
		}
		v.rememberChain(key, ek, info.SigningKey, candidates, i, chains)
	}

	// The report must agree with the certificate that signed it: its REPORTED_TCB is the TCB the
	// key was certified for, and its CHIP_ID (unless masked) the certified chip.
	consistent := func() error { return validate.SnpAttestation(att, permissiveSNPOptions()) }
	if line == snpTurin {
		consistent = func() error { return checkTurinReport(report, exts, info.SigningKey) }
	}
	if err := consistent(); err != nil {
		return nil, reject(ReasonChain, "report does not match its %v certificate: %w", info.SigningKey, err)
	}
	// A product line the caller expects that the verified report contradicts (from version 3
	// on, the report names its product) is reported, not silently overridden.
	if v.productLine != "" && report.GetCpuid1EaxFms() != 0 && v.productLine != line {
		return nil, reject(ReasonChain, "the report is from a %s machine (CPUID 0x%08x), not %s as expected", line, report.GetCpuid1EaxFms(), v.productLine)
	}

	if v.checkRevocations {
		if err := v.checkSNPRevocation(ctx, ek, info.SigningKey, root, now); err != nil {
			return nil, err
		}
	}

	table := &abi.CertTable{Entries: []abi.CertTableEntry{{GUID: uuid.MustParse(abi.VcekGUID), RawCert: ekDER}}}
	if info.SigningKey == abi.VlekReportSigner {
		table.Entries[0].GUID = uuid.MustParse(abi.VlekGUID)
	}
	claims := &Claims{ReportData: HexBytes(report.GetReportData()), SNP: snpClaimsOf(report, line, info.SigningKey)}
	claims.SNP.raw = append(append([]byte(nil), ev.raw...), table.Marshal()...)
	return claims, nil
}

// endorsementKey returns the DER certificate of the key that signed the report: from the
// certificate table, else from the collateral cache (a VCEK under its AMD KDS URL, fetched if
// the cache may fetch; a VLEK under snpVLEKURL, never fetched). It returns the product line,
// which it may learn from where it found the certificate.
func (v *snpVerifier) endorsementKey(ctx context.Context, ev *snpEvidence, key abi.ReportSigner, line string, roots map[string][]*trust.ProductCerts) ([]byte, string, error) {
	guid, getter := abi.VcekGUID, snpGetter{v.cache}
	if key == abi.VlekReportSigner {
		guid, getter = abi.VlekGUID, snpGetter{v.vlekCache}
	}
	if der := certByGUID(ev.certs, guid); der != nil {
		return der, line, nil
	}
	if key == abi.VlekReportSigner && v.vlekCache.dir == "" {
		return nil, "", reject(ReasonCollateral, "report is signed by a VLEK but its certificate table holds no VLEK certificate and there is no collateral cache")
	}
	chipID := ev.report.GetChipId()
	if key != abi.VlekReportSigner && bytes.Equal(chipID, make([]byte, abi.ChipIDSize)) {
		return nil, "", reject(ReasonCollateral, "report has no VCEK certificate and a masked chip ID, so its VCEK cannot be looked up")
	}
	lines := []string{line}
	if line == "" {
		lines = nil
		for _, l := range snpProductLines {
			if len(roots[l]) > 0 {
				lines = append(lines, l)
			}
		}
	}
	var errs []error
	for _, l := range lines {
		u := snpVCEKURL(l, chipID, ev.report.GetReportedTcb())
		if key == abi.VlekReportSigner {
			u = snpVLEKURL(l, ev.report.GetReportedTcb())
		}
		der, err := getter.GetContext(ctx, u)
		if err == nil {
			return der, l, nil
		}
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, "", ctxErr
		}
		errs = append(errs, err)
	}
	return nil, "", &RejectError{Reason: ReasonCollateral, Err: fmt.Errorf("getting %v certificate: %w", key, errors.Join(errs...))}
}

// chainRoot returns the first root among candidates that the endorsement key certificate
// chains to at now, its index and the chains that lead there; or nil.
func chainRoot(ek *x509.Certificate, key abi.ReportSigner, candidates []*trust.ProductCerts, now time.Time) (*trust.ProductCerts, int, [][]*x509.Certificate) {
	for i, pc := range candidates {
		opts := pc.X509Options(now, key)
		if opts == nil {
			continue
		}
		if chains, err := ek.Verify(*opts); err == nil {
			return pc, i, chains
		}
	}
	return nil, -1, nil
}

// snpChainEntry records that an endorsement key certificate passed go-sev-guest's checks of
// its certificate chain (decodeCerts: the certificate's version, algorithms, key, subject,
// issuer and extensions, and crypto/x509's chain building to the roots; for Turin, the same
// checks in verifyTurin) and that the first of the candidate roots it chains to is
// candidates[root], through chains. Every fact in it
// but the certificates' validity periods depends only on the bytes snpChainKey hashes.
type snpChainEntry struct {
	root   int
	chains [][]*x509.Certificate
}

// snpChainKey is the key of the chain entry for endorsement key certificate ekDER of kind
// key, verified for platform p against candidates (in order) under product line line, with
// the product line the report states (go-sev-guest's "known product line") and the product
// the verifier expects of version 2 reports. These are every input go-sev-guest's chain checks
// read besides the time.
func snpChainKey(p Platform, key abi.ReportSigner, report *spb.Report, line, expectProduct string, ekDER []byte, candidates []*trust.ProductCerts) cacheKey {
	known := ""
	if fms := report.GetCpuid1EaxFms(); fms != 0 {
		known = kds.ProductLineFromFms(fms)
	}
	fields := [][]byte{[]byte(p.String()), []byte(key.String()), []byte(known), []byte(line), []byte(expectProduct), ekDER}
	for _, pc := range candidates {
		var ark, ask, asvk []byte
		if pc.Ark != nil {
			ark = pc.Ark.Raw
		}
		if pc.Ask != nil {
			ask = pc.Ask.Raw
		}
		if pc.Asvk != nil {
			asvk = pc.Asvk.Raw
		}
		fields = append(fields, ark, ask, asvk)
	}
	return keyOf("lethe/attest/sev-snp/chain", fields...)
}

// cachedChainRoot returns the root the endorsement key certificate ek chains to, if the cache
// knows its chain, a chain it knows is within its validity period at now, and the report's
// signature verifies with ek. It returns nil otherwise, and the caller takes the full path.
//
// A non-nil result is exactly what the full path would find: go-sev-guest's chain checks
// passed for these bytes once and depend on nothing else but the time; a cached chain valid
// at now is one crypto/x509 builds at now; the candidates before the cached root can never
// chain to ek (rememberChain stores nothing otherwise), so the root chainRoot picks at now is
// the cached one; and the report signature, the one per-report fact, is checked here with the
// same go-sev-guest function the full path uses.
func (v *snpVerifier) cachedChainRoot(key cacheKey, report *spb.Report, ek *x509.Certificate, candidates []*trust.ProductCerts, now time.Time) *trust.ProductCerts {
	e, ok := v.chains.get(key)
	if !ok || e.root < 0 || e.root >= len(candidates) {
		return nil
	}
	if !slices.ContainsFunc(e.chains, func(c []*x509.Certificate) bool { return validAt(c, now) }) {
		return nil
	}
	if err := verify.SnpProtoReportSignature(report, ek); err != nil {
		return nil
	}
	return candidates[e.root]
}

// rememberChain stores that ek chained to candidates[root] through chains, after the full path
// accepted it. It stores nothing when a candidate before root could chain to ek at some other
// time, because then which root comes first would depend on the time.
func (v *snpVerifier) rememberChain(key cacheKey, ek *x509.Certificate, signer abi.ReportSigner, candidates []*trust.ProductCerts, root int, chains [][]*x509.Certificate) {
	if len(chains) == 0 {
		return
	}
	for _, pc := range candidates[:root] {
		if !neverChains(ek, signer, pc) {
			return
		}
	}
	v.chains.put(key, &snpChainEntry{root: root, chains: chains})
}

// neverChains reports whether ek can chain to pc at no time: crypto/x509 would have no
// certificate to put above ek, because ek is none of pc's certificates and neither pc's
// intermediate for signer nor its ARK signed it.
func neverChains(ek *x509.Certificate, signer abi.ReportSigner, pc *trust.ProductCerts) bool {
	ica := pc.Ask
	if signer == abi.VlekReportSigner {
		ica = pc.Asvk
	}
	if pc.Ark == nil || ica == nil {
		return true // chainRoot and go-sev-guest both skip such a root
	}
	for _, parent := range []*x509.Certificate{ica, pc.Ark} {
		if ek.Equal(parent) || ek.CheckSignatureFrom(parent) == nil {
			return false
		}
	}
	return true
}

// diagnoseSNP turns a failure of verify.SnpAttestation (whose errors are text) into a rejection
// with the right reason, by checking the signature and the chain on their own.
func diagnoseSNP(report []byte, ek *x509.Certificate, key abi.ReportSigner, candidates []*trust.ProductCerts, now time.Time, err error) error {
	if sigErr := verify.SnpReportSignature(report, ek); sigErr != nil {
		return reject(ReasonSignature, "verifying SEV-SNP report signature: %w", sigErr)
	}
	for _, pc := range candidates {
		opts := pc.X509Options(now, key)
		if opts == nil {
			continue
		}
		_, verr := ek.Verify(*opts)
		if ie, ok := errors.AsType[x509.CertificateInvalidError](verr); ok && ie.Reason == x509.Expired {
			return reject(ReasonExpired, "verifying %v certificate chain: %w", key, verr)
		}
	}
	return reject(ReasonChain, "verifying %v certificate chain: %w", key, err)
}

// checkSNPRevocation checks the ARK-signed CRL of the intermediate (for AMD's roots from the
// collateral cache, or fetched if allowed; for an emulator's, from the emulator's collateral)
// for the intermediate's and the endorsement key's serial numbers.
func (v *snpVerifier) checkSNPRevocation(ctx context.Context, ek *x509.Certificate, key abi.ReportSigner, root *trust.ProductCerts, now time.Time) error {
	ica := root.Ask
	if key == abi.VlekReportSigner {
		ica = root.Asvk
	}
	if len(ica.CRLDistributionPoints) == 0 {
		return reject(ReasonCollateral, "the %s certificate names no CRL", ica.Subject.CommonName)
	}
	getter := snpGetter{v.cache}
	if c, ok := v.emulatorCRLs[root]; ok {
		getter = snpGetter{c}
	}
	var errs []error
	for _, u := range ica.CRLDistributionPoints {
		der, err := getter.GetContext(ctx, u)
		if err != nil {
			if ctxErr := ctx.Err(); ctxErr != nil {
				return ctxErr
			}
			errs = append(errs, err)
			continue
		}
		// The CRL is read on every call; only its parsing and its signature check, which
		// depend on nothing but its bytes and the ARK's, are remembered.
		crlKey := keyOf("lethe/attest/sev-snp/crl", root.Ark.Raw, der)
		crl, ok := v.crls.get(crlKey)
		if !ok {
			if crl, err = x509.ParseRevocationList(der); err != nil {
				return reject(ReasonCollateral, "parsing CRL %s: %w", u, err)
			}
			if err := crl.CheckSignatureFrom(root.Ark); err != nil {
				return reject(ReasonCollateral, "CRL %s is not signed by the ARK: %w", u, err)
			}
			v.crls.put(crlKey, crl)
		}
		if !crl.NextUpdate.IsZero() && now.After(crl.NextUpdate) {
			return reject(ReasonExpired, "CRL %s was due for update at %s; refresh the collateral cache", u, crl.NextUpdate.UTC().Format(time.RFC3339))
		}
		for _, rc := range crl.RevokedCertificateEntries {
			switch {
			case rc.SerialNumber.Cmp(ica.SerialNumber) == 0:
				return reject(ReasonRevoked, "the %s certificate (serial %x) was revoked at %s", ica.Subject.CommonName, ica.SerialNumber, rc.RevocationTime.UTC().Format(time.RFC3339))
			case rc.SerialNumber.Cmp(ek.SerialNumber) == 0:
				return reject(ReasonRevoked, "the %v certificate (serial %x) was revoked at %s", key, ek.SerialNumber, rc.RevocationTime.UTC().Format(time.RFC3339))
			}
		}
		return nil
	}
	return &RejectError{Reason: ReasonCollateral, Err: fmt.Errorf("getting CRL: %w", errors.Join(errs...))}
}

// permissiveSNPOptions are validate.Options that require nothing of the guest: validate then
// checks only the report's consistency with its certificate (TCB, chip ID, firmware versions).
func permissiveSNPOptions() *validate.Options {
	return &validate.Options{
		GuestPolicy:               abi.SnpPolicy{SMT: true, MigrateMA: true, Debug: true, CXLAllowed: true},
		PermitProvisionalFirmware: true,
	}
}

func (t SNPTCB) parts() kds.TCBParts {
	return kds.TCBParts{BlSpl: t.BootLoader, TeeSpl: t.TEE, SnpSpl: t.SNP, UcodeSpl: t.Microcode}
}

func snpClaimsOf(r *spb.Report, line string, key abi.ReportSigner) *SNPClaims {
	// The policy parsed when the report did (ReportToProto checks it).
	pol, _ := abi.ParseSnpPolicy(r.GetPolicy())
	return &SNPClaims{
		Product:  line,
		Signer:   snpSignerName(key),
		Version:  r.GetVersion(),
		VMPL:     r.GetVmpl(),
		GuestSVN: r.GetGuestSvn(),
		Policy: SNPGuestPolicy{
			ABIMajor: pol.ABIMajor, ABIMinor: pol.ABIMinor, SMT: pol.SMT, MigrateMA: pol.MigrateMA,
			Debug: pol.Debug, SingleSocket: pol.SingleSocket,
		},
		Measurement:  HexBytes(r.GetMeasurement()),
		HostData:     HexBytes(r.GetHostData()),
		FamilyID:     HexBytes(r.GetFamilyId()),
		ImageID:      HexBytes(r.GetImageId()),
		ChipID:       HexBytes(r.GetChipId()),
		CurrentTCB:   snpTCBOf(line, r.GetCurrentTcb()),
		ReportedTCB:  snpTCBOf(line, r.GetReportedTcb()),
		CommittedTCB: snpTCBOf(line, r.GetCommittedTcb()),
		LaunchTCB:    snpTCBOf(line, r.GetLaunchTcb()),
		// AMD publishes no TCB status for SEV-SNP: policy decides with minimum TCBs.
		TCBStatus: "unknown",
	}
}

// checkSNP evaluates r on c: through go-sev-guest's validate package for what it checks (minimum
// TCB and launch TCB, guest policy bits, VMPL, host data), with own code for allowlists.
func checkSNP(c *SNPClaims, r SNPRequirements) error {
	if len(c.raw) < abi.ReportSize {
		return &Violation{Rule: "snp", Got: "claims not from a verified report", Want: "verified claims"}
	}
	ev, err := parseSNPEvidence(c.raw)
	if err != nil {
		return &Violation{Rule: "snp", Got: err.Error(), Want: "verified claims"}
	}
	chain := &spb.CertificateChain{
		VcekCert: certByGUID(ev.certs, abi.VcekGUID),
		VlekCert: certByGUID(ev.certs, abi.VlekGUID),
		Extras:   map[string][]byte{},
	}
	att := &spb.Attestation{Report: ev.report, CertificateChain: chain}
	// go-sev-guest's validate refuses Turin certificates (see snp_turin.go): a Turin report is
	// checked by checkTurinOptions, its TCBs in Turin's layout.
	turin := ev.report.GetCpuid1EaxFms() != 0 && kds.ProductLineFromFms(ev.report.GetCpuid1EaxFms()) == snpTurin
	check := func(set func(o *validate.Options)) error {
		o := permissiveSNPOptions()
		set(o)
		if turin {
			return checkTurinOptions(ev.report, o)
		}
		return validate.SnpAttestation(att, o)
	}

	var errs []error
	tcbRule := func(prefix string, got, min SNPTCB, set func(o *validate.Options)) {
		if min == (SNPTCB{}) {
			return
		}
		var verr error
		switch {
		case turin && !tcbLE(min, got):
			verr = fmt.Errorf("%v is below %v", got, min)
		case turin:
		case min.FMC > 0:
			// Only Turin on has FMC: a minimum FMC is unmet by the lines before it.
			verr = fmt.Errorf("a %s report has no FMC", c.Product)
		default:
			verr = check(set)
		}
		if verr == nil {
			return
		}
		n := len(errs)
		for _, comp := range []struct {
			name     string
			got, min uint8
		}{
			{"fmc", got.FMC, min.FMC},
			{"bootloader", got.BootLoader, min.BootLoader},
			{"tee", got.TEE, min.TEE},
			{"snp", got.SNP, min.SNP},
			{"microcode", got.Microcode, min.Microcode},
		} {
			if comp.got < comp.min {
				errs = append(errs, &Violation{Rule: prefix + "." + comp.name, Got: fmt.Sprintf("0x%02x", comp.got), Want: fmt.Sprintf("≥ 0x%02x", comp.min)})
			}
		}
		if len(errs) == n {
			errs = append(errs, &Violation{Rule: prefix, Got: verr.Error(), Want: "≥ " + min.String()})
		}
	}
	line := ""
	if turin {
		line = snpTurin
	}
	// The TCBs compared are the verified report's, not the claims' copies.
	tcbRule("snp.tcb", snpTCBOf(line, ev.report.GetReportedTcb()), r.MinimumTCB, func(o *validate.Options) { o.MinimumTCB = r.MinimumTCB.parts() })
	tcbRule("snp.launchTcb", snpTCBOf(line, ev.report.GetLaunchTcb()), r.MinimumLaunchTCB, func(o *validate.Options) { o.MinimumLaunchTCB = r.MinimumLaunchTCB.parts() })

	if !r.AllowDebug && check(func(o *validate.Options) { o.GuestPolicy.Debug = false }) != nil {
		errs = append(errs, &Violation{Rule: "snp.policy.debug", Got: "debug allowed (the host can read and change the guest's memory)", Want: "debug not allowed"})
	}
	if !r.AllowSMT && check(func(o *validate.Options) { o.GuestPolicy.SMT = false }) != nil {
		errs = append(errs, &Violation{Rule: "snp.policy.smt", Got: "SMT allowed", Want: "SMT not allowed"})
	}
	if !r.AllowMigrateMA && check(func(o *validate.Options) { o.GuestPolicy.MigrateMA = false }) != nil {
		errs = append(errs, &Violation{Rule: "snp.policy.migrateMA", Got: "migration agent allowed", Want: "migration agent not allowed"})
	}
	if r.VMPL != nil {
		want := int(*r.VMPL)
		if check(func(o *validate.Options) { o.VMPL = &want }) != nil {
			errs = append(errs, &Violation{Rule: "snp.vmpl", Got: fmt.Sprint(c.VMPL), Want: fmt.Sprint(*r.VMPL)})
		}
	}
	if len(r.HostData) > 0 && check(func(o *validate.Options) { o.HostData = r.HostData }) != nil {
		errs = append(errs, &Violation{Rule: "snp.hostData", Got: c.HostData.String(), Want: HexBytes(r.HostData).String()})
	}
	if len(r.Measurements) > 0 && !slices.ContainsFunc(r.Measurements, func(m []byte) bool { return bytes.Equal(m, c.Measurement) }) {
		errs = append(errs, &Violation{Rule: "snp.measurement", Got: c.Measurement.String(), Want: "one of " + snpHexList(r.Measurements)})
	}
	if len(r.ChipIDs) > 0 && !slices.ContainsFunc(r.ChipIDs, func(id []byte) bool { return bytes.Equal(id, c.ChipID) }) {
		errs = append(errs, &Violation{Rule: "snp.chipId", Got: c.ChipID.String(), Want: "one of " + snpHexList(r.ChipIDs)})
	}
	if len(r.Products) > 0 && !slices.Contains(r.Products, c.Product) {
		errs = append(errs, &Violation{Rule: "snp.product", Got: c.Product, Want: "one of " + joinNames(r.Products)})
	}
	return errors.Join(errs...)
}

func snpHexList(list [][]byte) string {
	s := make([]string, len(list))
	for i, b := range list {
		s[i] = HexBytes(b).String()
	}
	return joinNames(s)
}
