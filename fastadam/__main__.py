"""``python -m fastadam --info``: print the installation's configuration."""
import argparse
import sys

from ._config import show_config

parser = argparse.ArgumentParser(prog="python -m fastadam", description=__doc__)
parser.add_argument("--info", action="store_true", help="show version, backends, kernel variants, OpenMP")
args = parser.parse_args()
if not args.info:
    parser.print_help()
    sys.exit(0)
show_config()
