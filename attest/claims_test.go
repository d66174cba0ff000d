package attest

import "testing"

func TestParseSNPTCB(t *testing.T) {
	want := SNPTCB{BootLoader: 3, TEE: 0, SNP: 20, Microcode: 0x73}
	got, err := ParseSNPTCB("bl=3,tee=0,snp=20,ucode=0x73")
	if err != nil || got != want {
		t.Fatalf("ParseSNPTCB = %v, %v; want %v", got, err, want)
	}
	if back, err := ParseSNPTCB(want.String()); err != nil || back != want {
		t.Errorf("ParseSNPTCB(%q) = %v, %v; want %v", want.String(), back, err, want)
	}
	for _, bad := range []string{"bl=3,x=1", "bl=300", "bl", "ucode=-1", ""} {
		if _, err := ParseSNPTCB(bad); err == nil {
			t.Errorf("ParseSNPTCB(%q) accepted", bad)
		}
	}
}
