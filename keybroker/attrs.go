package keybroker

// Log and audit attribute keys.
const (
	attrComponent         = "component"
	attrEvent             = "event"
	attrMigration         = "migration"
	attrTenant            = "tenant"
	attrVM                = "vm"
	attrHost              = "host"
	attrDecision          = "decision"
	attrReasons           = "reasons"
	attrSourceDigest      = "source_evidence"
	attrDestinationDigest = "destination_evidence"
	attrErasureDigest     = "erasure_evidence"
	attrPolicyDigest      = "policy_digest"
	attrPolicySVN         = "policy_svn"
	attrEpoch             = "epoch"
	attrKeys              = "keys"
	attrError             = "error"
	attrAttempt           = "attempt"
	attrTTL               = "ttl"
)
