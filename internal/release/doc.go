// Package release makes Lethe's release artifacts reproducibly, from built binaries alone:
// gzipped tar archives whose bytes depend only on their files and one timestamp (owners,
// modes and times fixed), CycloneDX 1.5 SBOMs read from each binary's embedded build
// information, OCI image layouts of one static binary on an empty base, and a SHA256SUMS file
// with its Ed25519 signature, which Verify checks together with every file it lists.
//
// It runs no container tool and no network: an image is a layer tar, a config and a manifest
// written here, named by their SHA-256 digests.
package release
