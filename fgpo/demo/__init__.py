"""The embedded demo (``fgpo demo``): the whole pipeline on generated lesion scans, on a CPU,
with no network, using only the other subpackages (data -> pairs -> train -> eval)."""
