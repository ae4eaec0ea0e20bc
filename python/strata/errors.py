"""strata.Error and one subclass per STRATA_ERR_* status."""

import ctypes as C

from ._lib import STATUS_NAMES, lib


class Error(Exception):
    """A strata call failed. `status` is the number, `status_name` its name ("STRATA_ERR_IO"),
    `message` the library's explanation (strata_last_error)."""

    status = None

    def __init__(self, message, status=None):
        if status is not None:
            self.status = status
        self.status_name = (STATUS_NAMES[self.status] if self.status is not None
                            and self.status < len(STATUS_NAMES) else f"status {self.status}")
        self.message = message
        super().__init__(f"{self.status_name}: {message}")


class NullArgumentError(Error):
    status = 1


class InvalidArgumentError(Error, ValueError):
    status = 2


class InvalidHandleError(Error):
    status = 3


class NotFoundError(Error, LookupError):
    status = 4


class IoError(Error, OSError):
    status = 5


class FormatError(Error):
    status = 6


class UnsupportedError(Error):
    status = 7


class OutOfMemoryError(Error, MemoryError):
    status = 8


class BudgetError(Error):
    status = 9


class StateError(Error):
    status = 10


class NoDeviceError(Error):
    status = 11


class DeviceError(Error):
    status = 12


class BufferTooSmallError(Error):
    status = 13


class PanicError(Error):
    status = 14


_BY_STATUS = {cls.status: cls for cls in Error.__subclasses__()}


def last_error():
    """This thread's last error message from the library."""
    length = lib().strata_last_error(None, 0)
    buf = C.create_string_buffer(length + 1)
    lib().strata_last_error(buf, len(buf))
    return buf.value.decode("utf-8", "replace")


def check(status):
    """Raises the Error subclass for `status` with the library's message; OK returns None."""
    if status:
        raise _BY_STATUS.get(status, Error)(last_error(), status)
