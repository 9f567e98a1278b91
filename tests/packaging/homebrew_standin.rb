# A small stand-in for Homebrew's formula and `service do` language, to check
# packaging/homebrew/taskrunner.rb where Homebrew cannot run (Linux CI). It defines only the methods
# the real DSL has (a subset: the ones a formula like ours may use), with the argument shapes
# Homebrew accepts, so a misspelled method or a wrong argument raises. It then runs `install`
# and `post_install` in record-only mode (nothing is built) and prints the LaunchAgent plist that
# `brew services` would write from the `service do` block, as XML, on stdout.
#
#   ruby homebrew_standin.rb FORMULA.rb REPO_ROOT > homebrew.mxcl.taskrunner.plist
require "pathname"

$recorded = []

class Pathname
  # Homebrew's Pathname#install: moves files into the directory. Here: recorded, and sources that
  # are not build outputs must exist in the source tree.
  def install(*sources)
    sources.flatten.each do |s|
      s = s.keys.first if s.is_a?(Hash)
      path = Pathname(s.to_s)
      path = Pathname($repo_root) + path if path.relative?
      unless path.to_s.include?("/gen-docs/") || path.exist?
        raise ArgumentError, "install: #{s} does not exist in the source tree"
      end
      $recorded << [:install, to_s, s.to_s]
    end
  end

  def mkpath
    $recorded << [:mkpath, to_s]
  end
end

module Homebrew
  class Service
    KEEP_ALIVE_KEYS = [:always, :successful_exit, :crashed, :path].freeze
    PROCESS_TYPES = [:background, :standard, :interactive, :adaptive].freeze
    RUN_TYPES = [:immediate, :interval, :cron].freeze

    attr_reader :props

    def initialize(formula, &block)
      @formula = formula
      @props = {}
      instance_eval(&block)
      raise ArgumentError, "service: `run` is required" unless @props[:run]
    end

    def run(command = nil, macos: nil, linux: nil)
      command ||= macos || linux
      @props[:run] = Array(command).map(&:to_s)
    end

    def run_type(type)
      raise ArgumentError, "run_type: #{type.inspect} not one of #{RUN_TYPES}" unless RUN_TYPES.include?(type)
      @props[:run_type] = type
    end

    def keep_alive(value)
      if value.is_a?(Hash)
        bad = value.keys - KEEP_ALIVE_KEYS
        raise ArgumentError, "keep_alive: unknown keys #{bad}" unless bad.empty?
      elsif ![true, false].include?(value)
        raise ArgumentError, "keep_alive: true, false or a Hash"
      end
      @props[:keep_alive] = value
    end

    def process_type(type)
      raise ArgumentError, "process_type: #{type.inspect} not one of #{PROCESS_TYPES}" unless PROCESS_TYPES.include?(type)
      @props[:process_type] = type
    end

    def environment_variables(vars = {})
      raise ArgumentError, "environment_variables: a Hash" unless vars.is_a?(Hash)
      @props[:environment_variables] = vars.transform_keys(&:to_s).transform_values(&:to_s)
    end

    %i[working_dir root_dir input_path log_path error_log_path].each do |name|
      define_method(name) { |path| @props[name] = path.to_s }
    end

    %i[interval restart_delay nice].each do |name|
      define_method(name) { |value| raise ArgumentError, "#{name}: an Integer" unless value.is_a?(Integer); @props[name] = value }
    end

    def require_root(value)
      @props[:require_root] = value
    end

    def launch_only_once(value)
      @props[:launch_only_once] = value
    end

    # Homebrew's Service delegates these (and only these) to the formula.
    %i[bin etc libexec opt_bin opt_libexec opt_pkgshare opt_prefix opt_sbin var].each do |name|
      define_method(name) { @formula.public_send(name) }
    end

    def respond_to_missing?(*) = false

    def method_missing(name, *_args)
      raise NoMethodError, "service do: `#{name}` is not part of Homebrew's service language"
    end

    def to_plist
      d = { "Label" => "homebrew.mxcl.#{@formula.name}", "ProgramArguments" => @props[:run], "RunAtLoad" => true }
      ka = @props[:keep_alive]
      if ka.is_a?(Hash)
        m = { always: nil, successful_exit: "SuccessfulExit", crashed: "Crashed", path: "PathState" }
        d["KeepAlive"] = ka[:always] ? true : ka.to_h { |k, v| [m.fetch(k), v] }
      elsif !ka.nil?
        d["KeepAlive"] = ka
      end
      d["EnvironmentVariables"] = @props[:environment_variables] if @props[:environment_variables]
      d["WorkingDirectory"] = @props[:working_dir] if @props[:working_dir]
      d["StandardOutPath"] = @props[:log_path] if @props[:log_path]
      d["StandardErrorPath"] = @props[:error_log_path] if @props[:error_log_path]
      d["ProcessType"] = @props[:process_type].to_s.capitalize if @props[:process_type]
      plist(d)
    end

    private

    def plist(value)
      body = xml(value, "  ")
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n" \
        "<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n" \
        "<plist version=\"1.0\">\n#{body}</plist>\n"
    end

    def esc(s) = s.to_s.gsub("&", "&amp;").gsub("<", "&lt;").gsub(">", "&gt;")

    def xml(v, ind)
      case v
      when Hash then "#{ind}<dict>\n" + v.map { |k, x| "#{ind}  <key>#{esc(k)}</key>\n" + xml(x, ind + "  ") }.join + "#{ind}</dict>\n"
      when Array then "#{ind}<array>\n" + v.map { |x| xml(x, ind + "  ") }.join + "#{ind}</array>\n"
      when true then "#{ind}<true/>\n"
      when false then "#{ind}<false/>\n"
      when Integer then "#{ind}<integer>#{v}</integer>\n"
      else "#{ind}<string>#{esc(v)}</string>\n"
      end
    end
  end
end

class Formula
  class << self
    attr_reader :service_block, :test_block, :fields

    def field(name, value) = (@fields ||= {})[name] = value

    def desc(text) = field(:desc, String(text))
    def homepage(url) = field(:homepage, String(url))
    def license(spdx) = field(:license, spdx)
    def sha256(hex) = field(:sha256, String(hex))
    def version(v) = field(:version, v)

    def url(value, **opts)
      allowed = [:tag, :revision, :branch, :using]
      bad = opts.keys - allowed
      raise ArgumentError, "url: unknown options #{bad}" unless bad.empty?
      field(:url, [value, opts])
    end

    def head(value, **opts)
      bad = opts.keys - [:branch, :tag, :revision, :using]
      raise ArgumentError, "head: unknown options #{bad}" unless bad.empty?
      field(:head, [value, opts])
    end

    def depends_on(dep)
      name, kind = dep.is_a?(Hash) ? dep.first : [dep, nil]
      raise ArgumentError, "depends_on: #{kind.inspect}" unless [nil, :build, :test, :optional, :recommended].include?(kind)
      (@deps ||= []) << [name, kind]
    end

    def service(&block) = @service_block = block
    def test(&block) = @test_block = block

    def method_missing(name, *_args)
      raise NoMethodError, "formula: `#{name}` is not part of Homebrew's formula language"
    end

    def respond_to_missing?(*) = false
  end

  def initialize(root)
    @root = Pathname(root)
  end

  def name = self.class.name.downcase
  def version = self.class.fields[:version] || "0.1.0"
  def prefix = @root + "Cellar/#{name}/#{version}"
  def opt_prefix = @root + "opt/#{name}"
  def buildpath = @root + "build"

  %w[bin sbin lib libexec share].each { |d| define_method(d) { prefix + d } }
  %w[bin sbin lib libexec share].each { |d| define_method("opt_#{d}") { opt_prefix + d } }
  def pkgshare = share + name
  def opt_pkgshare = opt_share + name
  def doc = share + "doc/#{name}"
  def man = share + "man"
  (1..8).each { |n| define_method("man#{n}") { man + "man#{n}" } }
  def bash_completion = prefix + "etc/bash_completion.d"
  def zsh_completion = share + "zsh/site-functions"
  def fish_completion = share + "fish/vendor_completions.d"
  def etc = @root + "etc"
  def var = @root + "var"

  def std_cargo_args = ["--locked", "--root", prefix.to_s, "--path", "."]

  def system(cmd, *args)
    raise ArgumentError, "system: arguments must be strings or paths" unless ([cmd] + args).all? { |a| a.is_a?(String) || a.is_a?(Pathname) }
    $recorded << [:system, cmd, *args.map(&:to_s)]
  end

  def method_missing(name, *_args)
    raise NoMethodError, "formula: `#{name}` is not available to a formula"
  end

  def respond_to_missing?(*) = false
end

formula_path, $repo_root = ARGV
abort "usage: homebrew_standin.rb FORMULA.rb REPO_ROOT" unless formula_path && $repo_root
load formula_path
klass = Formula.subclasses.first or abort "#{formula_path}: no Formula subclass"
%i[desc homepage url license].each { |f| abort "#{formula_path}: `#{f}` missing" unless klass.fields[f] }
abort "#{formula_path}: no `service do` block" unless klass.service_block
abort "#{formula_path}: no `test do` block" unless klass.test_block

Dir.chdir($repo_root) do
  f = klass.new("/opt/homebrew")
  f.install
  f.post_install if f.respond_to?(:post_install, true) || klass.method_defined?(:post_install)
  f.caveats if klass.method_defined?(:caveats)
  abort "#{formula_path}: install runs no cargo build" unless $recorded.any? { |r| r[0] == :system && r[1] == "cargo" }
  $stderr.puts $recorded.map(&:inspect)
  puts Homebrew::Service.new(f, &klass.service_block).to_plist
end
