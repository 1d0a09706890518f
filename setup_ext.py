"""Native extension build for setup.py (filled in by the csrc/ work; none yet)."""


def ext_modules_and_cmdclass():
    return [], {}
