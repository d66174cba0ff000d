package broker

import "github.com/lethe-cc/lethe/internal/natsauth"

// replyAllowed reports whether reply is a subject under the inbox prefix of the caller of
// role and name: the only subjects the broker answers on (natsauth.ReplyAllowed).
func replyAllowed(reply string, role natsauth.Role, name string) bool {
	return natsauth.ReplyAllowed(reply, role, name)
}
