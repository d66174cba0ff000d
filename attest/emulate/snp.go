package emulate

import "errors"

func newSNP(opts Options) (Platform, error)              { return nil, errors.New("not built yet") }
func loadSNP(dir string, opts Options) (Platform, error) { return nil, errors.New("not built yet") }
