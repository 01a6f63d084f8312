"""Reading and writing checkpoints: one reader per format, one place that picks among them.

``open.open_checkpoint`` resolves a path (or Hub id), checks it once and asks the readers in order:
``dcp`` and ``sharded`` (known by their layout), then ``safetensors_file`` and ``torch_file``
(known by their first bytes, ``sniff``). Each reader is a ``base.Checkpoint``. ``factorized`` is
the dense view of a shrunk file over any of them; ``write`` saves checkpoints. ``source``,
``target``, ``names``, ``index``, ``bounded_json`` and ``hub`` import no torch: the CLI checks
paths with them before torch loads. See docs/ARCHITECTURE.md.
"""
