"""The TEE wire formats, each written once and used by both sides.

In the manner of go-sev-guest's `abi/`: these modules only cut bytes into fields and name
them. They check nothing cryptographic and decide nothing; the server's providers use them
to produce evidence, the client's verifiers to check it, so both read every byte alike.
Malformed input raises `EvidenceError` naming what is wrong (the server's providers turn it
into their own error).

  dcap.py              Intel DCAP quotes (SGX v3/v4, TDX v4): framing, report bodies, PCK chain
  snp.py               AMD SEV-SNP ATTESTATION_REPORT, TCB_VERSION, guest policy bits, the
                       GHCB certificate table, the VCEK's KDS name
  collateral_files.py  the collateral files: names, Intel's signed JSON, dcap-qvl's JSON,
                       timestamps and the validity window
"""
