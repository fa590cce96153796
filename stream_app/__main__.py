from stream_app.cli import main

main()
