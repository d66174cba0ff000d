package migagent

// Attribute keys of the agent's structured logs.
const (
	attrComponent = "component"
	attrHost      = "host"
	attrMigration = "migration"
	attrRole      = "role"
	attrTenant    = "tenant"
	attrVM        = "vm"
	attrBytes     = "bytes"
	attrEndpoint  = "endpoint"
	attrPhase     = "phase"
	attrRound     = "round"
	attrDigest    = "memory_digest"
	attrEpoch     = "epoch"
	attrReason    = "reason"
	attrOutcome   = "outcome"
	attrError     = "error"
	attrPaused    = "guest_paused"
	attrResumed   = "resumed"
	attrPlatform  = "platform"
	attrGuests    = "guests"
	attrDomain    = "domain"
)
