"""The seven links of the auditor's checklist, one module each, in order: :mod:`~auditor.links.quote`,
:mod:`~auditor.links.event_log`, :mod:`~auditor.links.compose`, :mod:`~auditor.links.on_chain`,
:mod:`~auditor.links.signature_chain`, :mod:`~auditor.links.envelope`, :mod:`~auditor.links.output`; and the
eighth, :mod:`~auditor.links.image`, when the auditor rebuilds the study image (``seal verify --rebuild``).

Each module names its link (``NUMBER``, ``NAME``, ``CHECK``) and has one ``check`` function: explicit immutable
inputs in (the parsed receipt, the auditor's pins, the proofs of the earlier links it depends on), a
:class:`~auditor.links.base.Held` out, or :class:`~auditor.links.base.Broken` with the reason. What they share is
in :mod:`auditor.links.base`.
"""
