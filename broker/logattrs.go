package broker

// Attribute keys of the broker's structured logs.
const (
	logKeyComponent = "component"
	logKeyBroker    = "broker"
	logKeyMigration = "migration"
	logKeyTenant    = "tenant"
	logKeyVM        = "vm"
	logKeyHost      = "host"
	logKeyPhase     = "phase"
	logKeyFrom      = "from"
	logKeyReason    = "reason"
	logKeyOp        = "op"
	logKeyError     = "error"
	logKeyOwner     = "owner"
	logKeyOutcome   = "outcome"
	logKeyEpoch     = "epoch"
	logKeySubject   = "subject"
	logKeyReply     = "reply"
	logKeyStream    = "stream"
	logKeyTry       = "try"
	// logKeyRetryIn is the pause before the next try.
	logKeyRetryIn = "retry_in"
	// logKeyNext is the destination a migration falls back to.
	logKeyNext = "next"
)
