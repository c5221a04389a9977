"""The command-line app that ships with jlora (``jlora finetune``, ``eval``, ``export``, ``merge``).

Built only on jlora's public library (``jlora.*``, ``jlora.hf``); the library never imports it.
Modules: ``cli`` (argument parsing), ``finetune`` (the training job), ``data`` (shipped datasets and
CSV), ``report`` (metrics files and plot).
"""
