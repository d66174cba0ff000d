package main

import "github.com/spf13/cobra"

func newKeygenCmd() *cobra.Command {
	return &cobra.Command{Use: "keygen", Short: "Make a tenant's Ed25519 policy-signing key pair"}
}
