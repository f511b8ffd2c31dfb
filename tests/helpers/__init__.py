"""Helper modules the tests import (tests/ is on sys.path through pyproject's pytest `pythonpath`)."""
