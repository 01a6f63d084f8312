from wcond.cli import main

main()
