from patinox.cli import main

main()
