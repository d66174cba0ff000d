package tlog

import (
	"fmt"

	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
)

var hasher = rfc6962.DefaultHasher

// Tree is the hashes of a log's perfect subtrees, built by appending leaf hashes: enough to
// compute the root of any prefix and any inclusion or consistency proof in O(log n). It
// holds 2n hashes for n leaves. It is not safe for concurrent use.
type Tree struct {
	// levels[l][i] is the hash of the perfect subtree of height l whose leaves are
	// [i·2^l, (i+1)·2^l).
	levels [][][]byte
}

// Size returns the number of leaves.
func (t *Tree) Size() uint64 {
	if len(t.levels) == 0 {
		return 0
	}
	return uint64(len(t.levels[0]))
}

// Append adds a leaf hash.
func (t *Tree) Append(leafHash []byte) {
	h := append([]byte(nil), leafHash...)
	for l := 0; ; l++ {
		if l == len(t.levels) {
			t.levels = append(t.levels, nil)
		}
		t.levels[l] = append(t.levels[l], h)
		i := len(t.levels[l]) - 1
		if i%2 == 0 {
			return
		}
		h = hasher.HashChildren(t.levels[l][i-1], h)
	}
}

// LeafHash returns the hash of leaf i.
func (t *Tree) LeafHash(i uint64) ([]byte, error) {
	if i >= t.Size() {
		return nil, fmt.Errorf("leaf %d of a tree of %d", i, t.Size())
	}
	return t.levels[0][i], nil
}

func (t *Tree) node(id compact.NodeID) []byte { return t.levels[id.Level][id.Index] }

// Root returns the root hash of the tree's first size leaves (RFC 9162 MTH; the empty tree's
// is SHA-256 of nothing).
func (t *Tree) Root(size uint64) ([]byte, error) {
	if size > t.Size() {
		return nil, fmt.Errorf("root of %d leaves of a tree of %d", size, t.Size())
	}
	ids := compact.RangeNodes(0, size, nil)
	if len(ids) == 0 {
		return hasher.EmptyRoot(), nil
	}
	root := t.node(ids[len(ids)-1])
	for i := len(ids) - 2; i >= 0; i-- {
		root = hasher.HashChildren(t.node(ids[i]), root)
	}
	return root, nil
}

// InclusionProof returns the proof that leaf index is in the tree of size leaves.
func (t *Tree) InclusionProof(index, size uint64) ([][]byte, error) {
	if size > t.Size() || index >= size {
		return nil, fmt.Errorf("inclusion of leaf %d in %d leaves of a tree of %d", index, size, t.Size())
	}
	nodes, err := proof.Inclusion(index, size)
	if err != nil {
		return nil, fmt.Errorf("proving inclusion of leaf %d in %d: %w", index, size, err)
	}
	return t.rehash(nodes)
}

// ConsistencyProof returns the proof that the tree of size1 leaves is a prefix of the tree of
// size2.
func (t *Tree) ConsistencyProof(size1, size2 uint64) ([][]byte, error) {
	if size2 > t.Size() || size1 > size2 {
		return nil, fmt.Errorf("consistency of %d and %d leaves of a tree of %d", size1, size2, t.Size())
	}
	nodes, err := proof.Consistency(size1, size2)
	if err != nil {
		return nil, fmt.Errorf("proving consistency of %d and %d: %w", size1, size2, err)
	}
	return t.rehash(nodes)
}

func (t *Tree) rehash(nodes proof.Nodes) ([][]byte, error) {
	hashes := make([][]byte, len(nodes.IDs))
	for i, id := range nodes.IDs {
		hashes[i] = t.node(id)
	}
	return nodes.Rehash(hashes, hasher.HashChildren)
}

// VerifyInclusion checks an inclusion proof of a leaf hash at index against a tree of size
// leaves with root.
func VerifyInclusion(index, size uint64, leafHash []byte, p [][]byte, root []byte) error {
	if err := proof.VerifyInclusion(hasher, index, size, leafHash, p, root); err != nil {
		return fmt.Errorf("verifying inclusion of leaf %d in %d: %w", index, size, err)
	}
	return nil
}

// VerifyConsistency checks that the tree of size1 leaves with root1 is a prefix of the tree of
// size2 leaves with root2.
func VerifyConsistency(size1, size2 uint64, p [][]byte, root1, root2 []byte) error {
	if err := proof.VerifyConsistency(hasher, size1, size2, p, root1, root2); err != nil {
		return fmt.Errorf("verifying consistency of %d and %d: %w", size1, size2, err)
	}
	return nil
}
