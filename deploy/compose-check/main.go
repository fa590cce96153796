// compose-check validates a Compose file the way `docker compose config` does, without a Docker engine:
// compose-go (the library docker compose itself loads files with) checks it against the Compose
// Specification's JSON schema, interpolates, normalises and checks references (depends_on, volumes,
// networks), then prints the resolved model as YAML. Exit 1 with the loader's error when it is invalid.
//
//	go run ./deploy/compose-check docker-compose.yml
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-check FILE")
		os.Exit(2)
	}
	if err := check(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "invalid:", err)
		os.Exit(1)
	}
}

func check(file string) error {
	path, err := filepath.Abs(file)
	if err != nil {
		return err
	}
	opts, err := cli.NewProjectOptions([]string{path}, cli.WithWorkingDirectory(filepath.Dir(path)),
		cli.WithName("stream-app"), cli.WithOsEnv, cli.WithConsistency(true), cli.WithResolvedPaths(false))
	if err != nil {
		return err
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		return err
	}
	out, err := project.MarshalYAML()
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(out)
	return err
}
