package libvirt

// Log attribute keys.
const (
	attrDomain   = "domain"
	attrSocket   = "socket"
	attrStep     = "step"
	attrURI      = "uri"
	attrCanceled = "cancelled"
	attrElapsed  = "elapsed"
	attrError    = "error"
)
