"""The CLI's commands: each is a typed function over the Python API (``blip2.cli`` builds the parser from it)."""

from blip2.commands.evaluation import capfilt, eval_
from blip2.commands.inference import ask, caption, chat, embed
from blip2.commands.model import info
from blip2.commands.search import (
            index_add,
            index_build,
            index_info,
            index_remove,
            search,
)
from blip2.commands.serve import serve
from blip2.commands.training import cache_features, demo, plot, shapes, train
from blip2.errors import InputError
from blip2.train.trainer import NonFiniteLossError

COMMANDS = [demo, info, caption, ask, chat, embed, serve, shapes, cache_features, train, plot, eval_, capfilt,
            ("index", [index_build, index_add, index_remove, index_info]), search]

# Errors about the user's input (and the conditions a user fixes: a missing or unwritable file, a run that
# diverged), printed as one clear line; anything else is a bug and keeps its traceback.
USER_ERRORS = (InputError, NonFiniteLossError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError)
