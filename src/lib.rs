//! The native module `ferroloop._ferroloop`: the module list only.

use pyo3::prelude::*;

mod errors;
mod event_loop;
mod fastcall;
mod gather;
mod handles;
mod py;
mod reactor;
mod sockets;
mod task;
mod timers;
mod transports;
mod wait;

#[pymodule]
fn _ferroloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<event_loop::EventLoop>()?;
    m.add_class::<handles::Handle>()?;
    m.add_class::<handles::TimerHandle>()?;
    handles::install(m.py())?;
    sockets::register(m)?;
    m.add_class::<task::Task>()?;
    m.add_class::<task::TaskIter>()?;
    m.add_class::<task::TaskWakeup>()?;
    m.add_class::<task::TaskStep>()?;
    m.add_function(wrap_pyfunction!(task::task_factory, m)?)?;
    m.add_class::<wait::WaitCounter>()?;
    m.add_function(wrap_pyfunction!(wait::any_coroutine, m)?)?;
    m.add_class::<gather::GatherState>()?;
    m.add_class::<gather::ShieldInner>()?;
    m.add_class::<gather::ShieldOuter>()?;
    m.add_function(wrap_pyfunction!(gather::gather, m)?)?;
    m.add_function(wrap_pyfunction!(gather::shield, m)?)?;
    task::install(m.py());
    task::remember_factory(m.py(), m.getattr("task_factory")?);
    m.add_class::<transports::stream::StreamCore>()?;
    m.add_class::<transports::tls::TlsProtocolCore>()?;
    m.add_function(wrap_pyfunction!(transports::tls::tls_app_write, m)?)?;
    m.add_function(wrap_pyfunction!(transports::tls::tls_do_read, m)?)?;
    m.add_function(wrap_pyfunction!(transports::tls::tls_do_write, m)?)?;
    m.add_function(wrap_pyfunction!(transports::tls::tls_process_outgoing, m)?)?;
    // Datagram and pipe transports (udp.rs, pipe.rs).
    m.add_class::<transports::udp::DatagramCore>()?;
    m.add_class::<transports::pipe::ReadPipeCore>()?;
    m.add_class::<transports::pipe::WritePipeCore>()?;
    fastcall::install(m.py())?;
    Ok(())
}
