package tlog

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"testing"
)

// The functions rfc* below are a second implementation of RFC 9162 section 2.1, written from
// the RFC's text alone, so that Tree (built on transparency-dev/merkle) is checked against the
// specification rather than against itself.

func rfcHash(parts ...[]byte) []byte {
	h := sha256.New()
	for _, p := range parts {
		h.Write(p)
	}
	return h.Sum(nil)
}

func rfcLeafHash(d []byte) []byte { return rfcHash([]byte{0x00}, d) }

func rfcNodeHash(l, r []byte) []byte { return rfcHash([]byte{0x01}, l, r) }

// rfcSplit is k of RFC 9162 2.1.1: the largest power of two smaller than n (n > 1).
func rfcSplit(n int) int {
	k := 1
	for k*2 < n {
		k *= 2
	}
	return k
}

// rfcMTH is MTH(D[n]) of RFC 9162 2.1.1.
func rfcMTH(d [][]byte) []byte {
	switch n := len(d); n {
	case 0:
		return rfcHash()
	case 1:
		return rfcLeafHash(d[0])
	default:
		k := rfcSplit(n)
		return rfcNodeHash(rfcMTH(d[:k]), rfcMTH(d[k:]))
	}
}

// rfcPath is PATH(m, D[n]) of RFC 9162 2.1.3.1.
func rfcPath(m int, d [][]byte) [][]byte {
	n := len(d)
	if n == 1 {
		return nil
	}
	k := rfcSplit(n)
	if m < k {
		return append(rfcPath(m, d[:k]), rfcMTH(d[k:]))
	}
	return append(rfcPath(m-k, d[k:]), rfcMTH(d[:k]))
}

// rfcProof is PROOF(m, D[n]) of RFC 9162 2.1.4.1.
func rfcProof(m int, d [][]byte) [][]byte { return rfcSubproof(m, d, true) }

func rfcSubproof(m int, d [][]byte, b bool) [][]byte {
	n := len(d)
	if m == n {
		if b {
			return nil
		}
		return [][]byte{rfcMTH(d)}
	}
	k := rfcSplit(n)
	if m <= k {
		return append(rfcSubproof(m, d[:k], b), rfcMTH(d[k:]))
	}
	return append(rfcSubproof(m-k, d[k:], false), rfcMTH(d[:k]))
}

// rfcVerifyInclusion is RFC 9162 2.1.3.2.
func rfcVerifyInclusion(index, size uint64, leafHash []byte, path [][]byte, root []byte) bool {
	if index >= size {
		return false
	}
	fn, sn := index, size-1
	r := leafHash
	for _, p := range path {
		if sn == 0 {
			return false
		}
		if fn&1 == 1 || fn == sn {
			r = rfcNodeHash(p, r)
			for fn&1 == 0 && fn != 0 {
				fn >>= 1
				sn >>= 1
			}
		} else {
			r = rfcNodeHash(r, p)
		}
		fn >>= 1
		sn >>= 1
	}
	return sn == 0 && bytes.Equal(r, root)
}

// rfcVerifyConsistency is RFC 9162 2.1.4.2, for 0 < size1 < size2; for size1 == size2 the
// proof is empty (2.1.4.1: SUBPROOF(m, D[m], true) = {}) and the roots are equal.
func rfcVerifyConsistency(size1, size2 uint64, root1, root2 []byte, path [][]byte) bool {
	if size1 == size2 {
		return len(path) == 0 && bytes.Equal(root1, root2)
	}
	if size1 == 0 || size1 > size2 || len(path) == 0 {
		return false
	}
	if size1&(size1-1) == 0 {
		path = append([][]byte{root1}, path...)
	}
	fn, sn := size1-1, size2-1
	for fn&1 == 1 {
		fn >>= 1
		sn >>= 1
	}
	fr, sr := path[0], path[0]
	for _, c := range path[1:] {
		if sn == 0 {
			return false
		}
		if fn&1 == 1 || fn == sn {
			fr = rfcNodeHash(c, fr)
			sr = rfcNodeHash(c, sr)
			for fn&1 == 0 && fn != 0 {
				fn >>= 1
				sn >>= 1
			}
		} else {
			sr = rfcNodeHash(sr, c)
		}
		fn >>= 1
		sn >>= 1
	}
	return bytes.Equal(fr, root1) && bytes.Equal(sr, root2) && sn == 0
}

const maxTestSize = 70

// testLeaves returns n distinct leaves and the Tree of their hashes.
func testLeaves(n int) ([][]byte, *Tree) {
	var leaves [][]byte
	t := &Tree{}
	for i := range n {
		leaf := fmt.Appendf(nil, "leaf %d", i)
		leaves = append(leaves, leaf)
		t.Append(LeafHash(leaf))
	}
	return leaves, t
}

func TestTreeRootIsRFC9162MTH(t *testing.T) {
	leaves, tree := testLeaves(maxTestSize)
	for n := 0; n <= maxTestSize; n++ {
		got, err := tree.Root(uint64(n))
		if err != nil {
			t.Fatalf("Root(%d): %v", n, err)
		}
		if want := rfcMTH(leaves[:n]); !bytes.Equal(got, want) {
			t.Errorf("Root(%d) = %x, RFC 9162 MTH = %x", n, got, want)
		}
	}
	for i, leaf := range leaves {
		got, err := tree.LeafHash(uint64(i))
		if err != nil || !bytes.Equal(got, rfcLeafHash(leaf)) {
			t.Errorf("LeafHash(%d) = %x, %v; want %x", i, got, err, rfcLeafHash(leaf))
		}
	}
	if _, err := tree.Root(maxTestSize + 1); err == nil {
		t.Error("Root beyond the tree's size: no error")
	}
	if _, err := tree.LeafHash(maxTestSize); err == nil {
		t.Error("LeafHash beyond the tree's size: no error")
	}
}

// corruptions returns altered copies of a proof: each hash with a flipped byte, the proof
// truncated, and the proof with a hash appended.
func corruptions(p [][]byte) map[string][][]byte {
	out := map[string][][]byte{}
	for i := range p {
		c := clonePath(p)
		c[i][len(c[i])/2] ^= 0x01
		out[fmt.Sprintf("byte flipped in hash %d", i)] = c
	}
	if len(p) > 0 {
		out["truncated"] = clonePath(p[:len(p)-1])
	}
	out["extended"] = append(clonePath(p), rfcHash([]byte("extra")))
	return out
}

func clonePath(p [][]byte) [][]byte {
	c := make([][]byte, len(p))
	for i := range p {
		c[i] = bytes.Clone(p[i])
	}
	return c
}

func TestInclusionProofsAgreeWithIndependentRFC9162Verifier(t *testing.T) {
	leaves, tree := testLeaves(maxTestSize)
	roots := make([][]byte, maxTestSize+1)
	for n := range roots {
		roots[n] = rfcMTH(leaves[:n])
	}
	for size := uint64(1); size <= maxTestSize; size++ {
		for index := range size {
			p, err := tree.InclusionProof(index, size)
			if err != nil {
				t.Fatalf("InclusionProof(%d, %d): %v", index, size, err)
			}
			leaf := rfcLeafHash(leaves[index])
			if want := rfcPath(int(index), leaves[:size]); !equalPaths(p, want) {
				t.Errorf("InclusionProof(%d, %d) is not RFC 9162 PATH(%d, D[%d])", index, size, index, size)
			}
			if !rfcVerifyInclusion(index, size, leaf, p, roots[size]) {
				t.Errorf("InclusionProof(%d, %d) fails the RFC 9162 verifier", index, size)
			}
			if err := VerifyInclusion(index, size, leaf, p, roots[size]); err != nil {
				t.Errorf("VerifyInclusion(%d, %d): %v", index, size, err)
			}

			type claim struct {
				index uint64
				proof [][]byte
			}
			bad := map[string]claim{}
			for name, q := range corruptions(p) {
				bad[name] = claim{index, q}
			}
			for _, j := range []uint64{index + 1, index - 1, index ^ 1} {
				if j < size && j != index {
					bad[fmt.Sprintf("claimed at index %d", j)] = claim{j, p}
				}
			}
			for name, c := range bad {
				if rfcVerifyInclusion(c.index, size, leaf, c.proof, roots[size]) {
					t.Errorf("inclusion of %d in %d, %s: the RFC 9162 verifier accepts it", index, size, name)
				}
				if VerifyInclusion(c.index, size, leaf, c.proof, roots[size]) == nil {
					t.Errorf("inclusion of %d in %d, %s: VerifyInclusion accepts it", index, size, name)
				}
			}
			// The proof for size, checked against another size and that size's root.
			for _, other := range []uint64{size - 1, size + 1} {
				if other <= index || other > maxTestSize {
					continue
				}
				if rfcVerifyInclusion(index, other, leaf, p, roots[other]) {
					t.Errorf("inclusion of %d in %d, claimed for size %d: the RFC 9162 verifier accepts it", index, size, other)
				}
				if VerifyInclusion(index, other, leaf, p, roots[other]) == nil {
					t.Errorf("inclusion of %d in %d, claimed for size %d: VerifyInclusion accepts it", index, size, other)
				}
			}
		}
	}
	if _, err := tree.InclusionProof(3, 3); err == nil {
		t.Error("InclusionProof(3, 3): no error")
	}
	if _, err := tree.InclusionProof(0, maxTestSize+1); err == nil {
		t.Error("InclusionProof beyond the tree's size: no error")
	}
}

func TestConsistencyProofsAgreeWithIndependentRFC9162Verifier(t *testing.T) {
	leaves, tree := testLeaves(maxTestSize)
	roots := make([][]byte, maxTestSize+1)
	for n := range roots {
		roots[n] = rfcMTH(leaves[:n])
	}
	for size2 := uint64(1); size2 <= maxTestSize; size2++ {
		for size1 := uint64(1); size1 <= size2; size1++ {
			p, err := tree.ConsistencyProof(size1, size2)
			if err != nil {
				t.Fatalf("ConsistencyProof(%d, %d): %v", size1, size2, err)
			}
			if want := rfcProof(int(size1), leaves[:size2]); !equalPaths(p, want) {
				t.Errorf("ConsistencyProof(%d, %d) is not RFC 9162 PROOF(%d, D[%d])", size1, size2, size1, size2)
			}
			if !rfcVerifyConsistency(size1, size2, roots[size1], roots[size2], p) {
				t.Errorf("ConsistencyProof(%d, %d) fails the RFC 9162 verifier", size1, size2)
			}
			if err := VerifyConsistency(size1, size2, p, roots[size1], roots[size2]); err != nil {
				t.Errorf("VerifyConsistency(%d, %d): %v", size1, size2, err)
			}
			if size1 == size2 {
				continue
			}

			bad := corruptions(p)
			for name, q := range bad {
				if rfcVerifyConsistency(size1, size2, roots[size1], roots[size2], q) {
					t.Errorf("consistency of %d and %d, %s: the RFC 9162 verifier accepts it", size1, size2, name)
				}
				if VerifyConsistency(size1, size2, q, roots[size1], roots[size2]) == nil {
					t.Errorf("consistency of %d and %d, %s: VerifyConsistency accepts it", size1, size2, name)
				}
			}
			// The proof checked for other sizes, with those sizes' roots.
			for _, s := range [][2]uint64{{size1 - 1, size2}, {size1 + 1, size2}, {size1, size2 - 1}, {size1, size2 + 1}} {
				if s[0] == 0 || s[0] >= s[1] || s[1] > maxTestSize {
					continue
				}
				if rfcVerifyConsistency(s[0], s[1], roots[s[0]], roots[s[1]], p) {
					t.Errorf("consistency of %d and %d, claimed for %d and %d: the RFC 9162 verifier accepts it", size1, size2, s[0], s[1])
				}
				if VerifyConsistency(s[0], s[1], p, roots[s[0]], roots[s[1]]) == nil {
					t.Errorf("consistency of %d and %d, claimed for %d and %d: VerifyConsistency accepts it", size1, size2, s[0], s[1])
				}
			}
			// Another tree's root for the larger size: the same prefix does not extend it.
			other := rfcMTH(append(append([][]byte(nil), leaves[:size2-1]...), []byte("forked")))
			if rfcVerifyConsistency(size1, size2, roots[size1], other, p) || VerifyConsistency(size1, size2, p, roots[size1], other) == nil {
				t.Errorf("consistency of %d and %d: accepted against a tree whose last leaf differs", size1, size2)
			}
		}
	}
	if _, err := tree.ConsistencyProof(5, 4); err == nil {
		t.Error("ConsistencyProof(5, 4): no error")
	}
	if _, err := tree.ConsistencyProof(1, maxTestSize+1); err == nil {
		t.Error("ConsistencyProof beyond the tree's size: no error")
	}
}

func equalPaths(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}

func BenchmarkTreeAppend(b *testing.B) {
	h := LeafHash([]byte("leaf"))
	t := &Tree{}
	for b.Loop() {
		t.Append(h)
	}
}

func BenchmarkInclusionProof(b *testing.B) {
	_, t := testLeaves(1 << 16)
	for b.Loop() {
		if _, err := t.InclusionProof(12345, 1<<16); err != nil {
			b.Fatal(err)
		}
	}
}
