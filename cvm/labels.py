"""Names the CVM writes into its measurements and report data, shared by the code that writes them and the
auditor that reads them back. Each label namespaces and versions what it prefixes, so no two uses can collide.
"""

# RTMR3 event: the ciphertext digests a study run actually opened (cvm.unwrap writes it; the auditor checks it).
INPUTS_EVENT = "sealroom-inputs"

# Federated aggregator: report data = sha512(label ‖ nonce ‖ X25519 public key) binds its update key to its quote.
AGGREGATOR_REPORT_LABEL = b"sealroom-fed-aggregator/v1:"
# Federated aggregator: the box context for a site's update (label ‖ round-contract digest).
UPDATE_BOX_LABEL = b"sealroom-fed-update-box/v1:"
