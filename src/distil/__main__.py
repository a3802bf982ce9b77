from distil.cli import entry

entry()
