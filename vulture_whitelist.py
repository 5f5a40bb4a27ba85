"""Names vulture reports as unused that are used, by a framework, by an interface or by
Python itself: ``make lint`` reads this file with the code (vulture src tests bench ...).

Anything else vulture finds is dead code: delete it. A new false positive goes here, in its
group, with the reason it is not dead.
"""

# ruff: noqa
# mypy: ignore-errors
_ = object()

# Twisted calls these: IPushProducer / IBodyProducer, ProcessProtocol, Protocol.logPrefix,
# Resource.render_GET, Site.requestFactory, HTTPChannel.timeoutConnection and _abortingCall,
# HTTPConnectionPool.maxPersistentPerHost, IReactorPluggableNameResolver, IResolutionReceiver.
_.pauseProducing
_.resumeProducing
_.startProducing
_.outReceived
_.errReceived
_.processEnded
_.logPrefix
_.render_GET
_.timeoutConnection
_._abortingCall
_.maxPersistentPerHost
_.installNameResolver
requestFactory
resolutionInProgress
addressTypes
transportSemantics

# txpostgres calls these on its ConnectionPool.
_.connectionFactory
_._runQuery
_._runOperation
_._runInteraction

# twistd reads the plugin's IServiceMaker and usage.Options attributes.
synopsis
longdesc
optParameters
_.postOptions
tapname
_.makeService
serviceMaker

# PyYAML's Emitter.increase_indent(flow, indentless): an override keeps the signature.
indentless

# upstream/http.py: a TYPE_CHECKING-only function that has mypy check the UpstreamSession
# contract.
_conforms

# asyncio protocols (bench/): Protocol and SubprocessProtocol callbacks and their arguments.
_.connection_made
_.data_received
_.connection_lost
_.pipe_data_received
_.process_exited
exc

# The mcp SDK's EventStore interface (tests' HTTP fixtures).
_.store_event
_.replay_events_after

# http.server: BaseHTTPRequestHandler's do_* and log_message, ThreadingMixIn.daemon_threads.
do_DELETE
do_GET
do_PATCH
do_POST
do_PUT
_.do_POST
_.log_message
_.daemon_threads

# pytest: module marks, a fixture requested by name only, hooks in conftest.py.
pytestmark
pytest_configure
broken_migration

# Selenium's ChromeOptions.binary_location, set for the driver.
_.binary_location

# twisted.web.client.HTTPConnectionPool: idle connections' lifetime, read by the pool.
_.cachedConnectionTimeout

# The mcp SDK's interfaces implemented by the tests' OAuth fixtures: TokenVerifier and
# TokenStorage.
_.verify_token
_.get_tokens
_.set_tokens
_.get_client_info
_.set_client_info

# twistd's ServerOptions: how it finds service makers, read by its subCommands (cli/serve.py).
_._getPlugins
