"""Names the CVM writes into its measurements and report data, shared by the code that writes them and the
auditor that reads them back. Each label namespaces and versions what it prefixes, so no two uses can collide.
"""

# RTMR3 event: the ciphertext digests a study run actually opened (cvm.unwrap writes it; the auditor checks it).
INPUTS_EVENT = "sealroom-inputs"

# Federated aggregator: report data = sha512(label ‖ nonce ‖ X25519 public key) binds its update key to its quote.
AGGREGATOR_REPORT_LABEL = b"sealroom-fed-aggregator/v1:"
# Federated aggregator: the box context for a site's update (label ‖ round-contract digest).
UPDATE_BOX_LABEL = b"sealroom-fed-update-box/v1:"

# The line a study run prints to its log after each training epoch, "progress: epoch DONE/EPOCHS" (cvm.run writes
# it; the backend reads the last one into the run view). Progress only: the epoch count is the manifest's.
EPOCH_PROGRESS = "progress: epoch"
