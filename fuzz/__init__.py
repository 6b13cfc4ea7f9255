"""Coverage-guided fuzzing of the DICOM reading path (atheris, libFuzzer): `python -m fuzz`.

A study is refused with a typed `preprocess.StudyError` or read; any other exception, a hang past
the per-input timeout or memory past the RSS limit is a crash. `target` turns one fuzz input into a
study (one file, several files, or a folder of files), `corpus` writes the seed corpus.

`make fuzz` runs the whole path (`--depth study`, S=16) for 60 s, about 230 inputs a second on the
2-core development VM. The whole path is too slow for long runs (~60 ms per 16-slice study), so
they use the header depth: 1,000,000 inputs of at most 4 KiB, guided by coverage of `preprocess`
(`python -m fuzz --depth header --instrument preprocess --max-len 4096 --runs 1000000 --seed 7`)
ran in 39.5 min (422 a second, peak RSS 356 MB, slowest input under 1 s) without a crash.
"""
