from wcond.cli import app

app(prog_name="wcond")
