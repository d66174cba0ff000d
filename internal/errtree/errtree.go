// Package errtree finds errors of one type in an error's tree. It imports nothing but the
// standard library, so that leaf packages (attest, policy's decoder) can use it.
package errtree

// All returns every error of type T in err's tree (err itself, what it wraps with Unwrap()
// error, and each branch of Unwrap() []error), depth first, in order. It does not look
// inside an error of type T.
func All[T error](err error) []T {
	var out []T
	var walk func(error)
	walk = func(err error) {
		switch e := err.(type) {
		case nil:
		case T:
			out = append(out, e)
		case interface{ Unwrap() []error }:
			for _, x := range e.Unwrap() {
				walk(x)
			}
		case interface{ Unwrap() error }:
			walk(e.Unwrap())
		}
	}
	walk(err)
	return out
}
