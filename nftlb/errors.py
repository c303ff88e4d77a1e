"""Exceptions nftlb raises on purpose, each carrying the exit code the CLI returns."""

EXIT_OK = 0
EXIT_DIFFERENT = 1  # `nftlb diff`: the live table differs from the file
EXIT_BAD_INPUT = 2  # bad file, bad option, bad usage
EXIT_SYSTEM = 3  # the kernel, nft, the state dir or the OS said no


class NftlbError(Exception):
    exit_code = EXIT_SYSTEM


class ConfigError(NftlbError):
    """The pools file is unusable; `problems` lists every problem found."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UsageError(NftlbError):
    exit_code = EXIT_BAD_INPUT


class KernelError(NftlbError):
    """nft or libnftables refused a command; the message carries what nft said."""


class StateError(NftlbError):
    """The state dir cannot be read, written or locked."""
