# Homebrew formula for taskrunner (a tap formula: `brew install --HEAD ./taskrunner.rb`, or from a
# tap). Builds from source with cargo; `brew services start taskrunner` runs the daemon as a
# LaunchAgent of the logged-in user (use launchd/com.taskrunner.taskrunner.plist for a
# system-wide LaunchDaemon). Config under $(brew --prefix)/etc/taskrunner, logs under
# $(brew --prefix)/var/log/taskrunner, state under $(brew --prefix)/var/lib/taskrunner.
class Taskrunner < Formula
  desc "AWS Data Pipeline Task Runner as a system service"
  homepage "https://github.com/taskrunner/taskrunner"
  url "https://github.com/taskrunner/taskrunner.git", tag: "v0.1.0"
  license "Apache-2.0"
  head "https://github.com/taskrunner/taskrunner.git", branch: "main"

  depends_on "rust" => :build

  def install
    system "cargo", "install", *std_cargo_args
    # Man pages and completions come from the binaries' clap commands.
    system "cargo", "run", "--release", "--locked", "--example", "gen-docs", "--", buildpath/"gen-docs"
    man1.install buildpath/"gen-docs/man/taskrunner-ctl.1", buildpath/"gen-docs/man/datapipeline-local.1"
    man8.install buildpath/"gen-docs/man/taskrunner.8"
    bash_completion.install Dir[buildpath/"gen-docs/completions/bash/*"]
    zsh_completion.install Dir[buildpath/"gen-docs/completions/zsh/*"]
    fish_completion.install Dir[buildpath/"gen-docs/completions/fish/*"]
    # etc is kept across upgrades by Homebrew: an edited config.toml is not overwritten.
    (etc/"taskrunner").install "packaging/config.toml" if File.exist?("packaging/config.toml")
    pkgshare.install "packaging/credentials.json.example"
  end

  def post_install
    (var/"lib/taskrunner").mkpath
    (var/"log/taskrunner").mkpath
    (var/"run/taskrunner").mkpath
  end

  def caveats
    <<~EOS
      Set the worker group and region in #{etc}/taskrunner/config.toml, and put the
      credentials in #{etc}/taskrunner/credentials.json (mode 0600; an example is in
      #{opt_pkgshare}/credentials.json.example), then:
        brew services start taskrunner
        taskrunner-ctl status
    EOS
  end

  service do
    run [opt_bin/"taskrunner", "--settings", etc/"taskrunner/config.toml",
         "--config", etc/"taskrunner/credentials.json"]
    # The daemon takes the same directory variables it gets from systemd.
    environment_variables STATE_DIRECTORY:   var/"lib/taskrunner",
                          LOGS_DIRECTORY:    var/"log/taskrunner",
                          RUNTIME_DIRECTORY: var/"run/taskrunner"
    # Restarted when it exits non-zero (a crash; also 78, a config error: launchd throttles that to
    # one start per 10 s, and the log says why); not after a clean drain (exit 0).
    keep_alive successful_exit: false
    working_dir var/"lib/taskrunner"
    log_path var/"log/taskrunner/taskrunner.log"
    error_log_path var/"log/taskrunner/taskrunner.log"
    process_type :background
  end

  test do
    assert_match version.to_s, shell_output("#{bin}/taskrunner --version")
    # No daemon answers: taskrunner-ctl exits 3, like `systemctl status`.
    shell_output("#{bin}/taskrunner-ctl status", 3)
  end
end
