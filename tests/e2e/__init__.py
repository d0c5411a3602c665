"""End-to-end tests: real ``lanshare daemon`` processes in network-namespace lab hosts."""
