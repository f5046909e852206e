"""Real clients: the P-RGE step as an ExecuTorch program (export to .pte, run with ExecuTorch's runtime).

* :mod:`~fedprge.export.program`: the exportable modules (directions from seeds, 2q perturbed losses).
* :mod:`~fedprge.export.lower`: torch.export -> ``to_edge_transform_and_lower`` (XNNPACK or portable) -> .pte.
* :mod:`~fedprge.export.runtime`: :class:`PTEProgram`, a .pte run by ExecuTorch's Python runtime.
* ``python -m fedprge.export``: the command line.
"""
