package main

import "github.com/spf13/cobra"

func newAttestCmd() *cobra.Command {
	return &cobra.Command{Use: "attest", Short: "Emulate and verify attestation evidence"}
}
