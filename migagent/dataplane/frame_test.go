package dataplane

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"io"
	"testing"
)

func testAEAD(t testing.TB, seed byte) cipher.AEAD {
	t.Helper()
	key := bytes.Repeat([]byte{seed}, 32)
	b, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

var testTranscript = bytes.Repeat([]byte{7}, 32)

// sealFrames seals n page frames of one page each on stream 0 and returns each frame.
func sealFrames(t testing.TB, n int) [][]byte {
	t.Helper()
	w := newFrameWriter(testAEAD(t, 1), 0, testTranscript)
	var frames [][]byte
	for i := range n {
		page := bytes.Repeat([]byte{byte(i + 1)}, PageSize)
		frames = append(frames, bytes.Clone(w.seal(nil, framePages, uint64(i), 1, page)))
	}
	frames = append(frames, bytes.Clone(w.seal(nil, frameFin, 0, 0, w.fin(nil, nil))))
	return frames
}

// readAll reads and opens frames until an error, returning it (nil after a checked FIN).
func readAll(t testing.TB, in []byte, aead cipher.AEAD) error {
	r := newFrameReader(bytes.NewReader(in), aead, 0, testTranscript)
	var buf []byte
	for {
		h, frame, err := r.read(buf)
		if err != nil {
			if err == io.EOF {
				return &FrameError{Err: ErrTruncatedFrame}
			}
			return err
		}
		buf = frame
		pt, err := r.open(frame[headerSize:headerSize], h, frame)
		if err != nil {
			return err
		}
		if h.typ == frameFin {
			return r.checkFin(h, frame, pt)
		}
	}
}

func TestFrameTampering(t *testing.T) {
	frames := sealFrames(t, 4)
	join := func(fs ...[]byte) []byte { return bytes.Join(fs, nil) }
	altered := func(f []byte, i int) []byte {
		g := bytes.Clone(f)
		g[i] ^= 0x40
		return g
	}
	tests := map[string]struct {
		in      []byte
		key     byte
		wantErr error
	}{
		"intact":          {in: join(frames...), key: 1},
		"reordered":       {in: join(frames[0], frames[2], frames[1], frames[3], frames[4]), key: 1, wantErr: ErrReorderedFrame},
		"dropped":         {in: join(frames[0], frames[1], frames[3], frames[4]), key: 1, wantErr: ErrReorderedFrame},
		"repeated":        {in: join(frames[0], frames[1], frames[1], frames[2], frames[3], frames[4]), key: 1, wantErr: ErrReplayedFrame},
		"truncated-frame": {in: join(frames[0], frames[1][:100]), key: 1, wantErr: ErrTruncatedFrame},
		"truncated-head":  {in: join(frames[0], frames[1][:10]), key: 1, wantErr: ErrTruncatedFrame},
		"no-fin":          {in: join(frames[:4]...), key: 1, wantErr: ErrTruncatedFrame},
		"altered-offset":  {in: join(frames[0], altered(frames[1], 23), frames[2]), key: 1, wantErr: ErrFrameAuthentication},
		"altered-payload": {in: join(frames[0], altered(frames[1], headerSize+5), frames[2]), key: 1, wantErr: ErrFrameAuthentication},
		"altered-tag":     {in: join(frames[0], altered(frames[1], len(frames[1])-1), frames[2]), key: 1, wantErr: ErrFrameAuthentication},
		"altered-type":    {in: join(frames[0], altered(frames[1], 1)), key: 1, wantErr: ErrMalformedFrame},
		"altered-stream":  {in: join(frames[0], altered(frames[1], 7)), key: 1, wantErr: ErrMisroutedFrame},
		"altered-version": {in: join(altered(frames[0], 0)), key: 1, wantErr: ErrMalformedFrame},
		"altered-length":  {in: join(altered(frames[0], 30)), key: 1, wantErr: ErrMalformedFrame},
		"wrong-key":       {in: join(frames...), key: 2, wantErr: ErrFrameAuthentication},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := readAll(t, tc.in, testAEAD(t, tc.key))
			if !errors.Is(err, tc.wantErr) || (err != nil) != (tc.wantErr != nil) {
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				var fe *FrameError
				if !errors.As(err, &fe) {
					t.Fatalf("got %T, want *FrameError", err)
				}
			}
		})
	}
}

func TestFinMismatch(t *testing.T) {
	w := newFrameWriter(testAEAD(t, 1), 0, testTranscript)
	page := make([]byte, PageSize)
	f0 := bytes.Clone(w.seal(nil, framePages, 0, 1, page))
	// A FIN whose counts say one more page was sent than was.
	w.counts.pages++
	fin := bytes.Clone(w.seal(nil, frameFin, 0, 0, w.fin(nil, nil)))
	err := readAll(t, append(f0, fin...), testAEAD(t, 1))
	if !errors.Is(err, ErrIncomplete) {
		t.Fatalf("got %v, want ErrIncomplete", err)
	}
}

func FuzzFrameReader(f *testing.F) {
	frames := sealFrames(f, 3)
	f.Add(bytes.Join(frames, nil))
	f.Add(frames[0])
	f.Add(frames[0][:headerSize])
	f.Add(bytes.Join([][]byte{frames[1], frames[0]}, nil))
	w := newFrameWriter(testAEAD(f, 1), 0, testTranscript)
	f.Add(bytes.Clone(w.seal(nil, frameData, 0, 0, []byte("hello"))))
	f.Add(bytes.Clone(w.seal(nil, frameZeroPages, 0, 3, nil)))
	f.Add(bytes.Clone(w.seal(nil, frameAbort, 0, 0, []byte("no"))))
	known := []error{ErrReorderedFrame, ErrReplayedFrame, ErrTruncatedFrame, ErrFrameAuthentication,
		ErrMisroutedFrame, ErrMalformedFrame, ErrIncomplete}
	aead := testAEAD(f, 1)
	f.Fuzz(func(t *testing.T, in []byte) {
		err := readAll(t, in, aead)
		if err == nil {
			return
		}
		for _, k := range known {
			if errors.Is(err, k) {
				return
			}
		}
		t.Fatalf("unnamed error: %v", err)
	})
}
