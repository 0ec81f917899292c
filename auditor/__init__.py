"""The auditor: `seal verify attestation.json` (docs/auditor.md).

- :mod:`auditor.verify`: :func:`~auditor.verify.verify_receipt`, the entry point, and what callers import;
- :mod:`auditor.receipt`: loading attestation.json and its evidence, parsed once into immutable values;
- :mod:`auditor.links`: one module per link of the seven-link checklist (and link 8, ``image``, with a rebuild);
- :mod:`auditor.rebuild`: the study image rebuilt from a source tree (``seal verify --rebuild SOURCE``);
- :mod:`auditor.report`: the per-link results and the verdict; :mod:`auditor.render`: the printed checklist.

Errors::

    ReceiptError
    └── NotAReceipt(reason)   the document is not a sealroom-attestation/v1 receipt: nothing to verify

Every other problem with a receipt is a failed link in the report (inside a link, :class:`auditor.links.base.Broken`
never leaves :func:`~auditor.verify.verify_receipt`).
"""
