"""Coverage-guided fuzzing of the DICOM reading path (atheris, libFuzzer): `python -m fuzz`.

A study is refused with a typed `preprocess.StudyError` or read; any other exception, a hang past
the per-input timeout or memory past the RSS limit is a crash. `target` turns one fuzz input into a
study (one file, several files, or a folder of files), `corpus` writes the seed corpus.
"""
