"""The CLI's commands: each is a typed function over the Python API (``blip2.cli`` builds the parser from it)."""

from blip2.commands.evaluation import capfilt, eval_
from blip2.commands.inference import ask, caption, chat, embed
from blip2.commands.model import info
from blip2.commands.serve import serve
from blip2.commands.search import index_add, index_build, index_info, index_remove, search
from blip2.commands.training import cache_features, demo, plot, shapes, train
from blip2.config import ConfigError
from blip2.weights.keymap import KeyMapError
from blip2.weights.offline import MissingPartError

COMMANDS = [demo, info, caption, ask, chat, embed, serve, shapes, cache_features, train, plot, eval_, capfilt,
            ("index", [index_build, index_add, index_remove, index_info]), search]

# Errors that mean "the input was wrong", printed as one clear line instead of a traceback.
USER_ERRORS = (ConfigError, KeyMapError, MissingPartError, FileNotFoundError, ValueError)
