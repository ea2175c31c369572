"""C-STORE status codes segnode answers with (PS3.4 B.2.3, PS3.7 C). STOW-RS reuses them as
Failure Reason (0008,1197)."""

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122  # command's SOP class differs from the negotiated context
OUT_OF_RESOURCES = 0xA700  # disk below the floor, or the write/index failed
DATASET_MISMATCH = 0xA900  # dataset's SOP class/instance differ from the command, or wrong study (STOW)
CANNOT_UNDERSTAND = 0xC210  # bytes are not a complete DICOM dataset
MISSING_IDENTIFIER = 0xC211  # SOP Instance, Study or Series UID absent
INVALID_UID = 0xC212  # a UID that is not a valid UID (e.g. path characters)
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # STOW-RS: a part's file meta names a transfer syntax DIMSE would not accept

# What the operator or the sender should do about each refusal (goes into the log line).
HINTS = {
    SOP_CLASS_NOT_SUPPORTED: "the sender put the instance on the wrong presentation context; check its configuration",
    OUT_OF_RESOURCES: "free disk space in the data directory or check the database; the sender may retry",
    DATASET_MISMATCH: "the sender's command and dataset disagree (or the study is not the one addressed); fix the sender",
    CANNOT_UNDERSTAND: "the sender must resend a complete DICOM dataset",
    MISSING_IDENTIFIER: "the instance lacks a required UID; fix it at the source",
    INVALID_UID: "the instance carries a malformed UID; fix it at the source",
    TRANSFER_SYNTAX_NOT_SUPPORTED: "the part is encoded in a transfer syntax the node cannot read; send it uncompressed "
                                   "(1.2.840.10008.1.2.1) or in a standard compressed syntax",
}
