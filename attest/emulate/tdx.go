package emulate

import "errors"

func newTDX(opts Options) (Platform, error)              { return nil, errors.New("not built yet") }
func loadTDX(dir string, opts Options) (Platform, error) { return nil, errors.New("not built yet") }
